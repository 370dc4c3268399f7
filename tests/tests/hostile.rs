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
use std::time::Duration;
use tests::daemon::{Daemon, ScratchDir};
use tests::raw_frontend::*;
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
/// How long to wait for the device to consume a chain it may drop.
const CONSUME_TIMEOUT: Duration = Duration::from_secs(2);

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
                // vubd's own memory policy: the frontend seals its memfd.
                Daemon::vubd_sealed_only(&socket, &image, &args)?
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
        // The chain may be dropped without coming back; make sure the
        // device is done with it before its descriptor slots are reused.
        let early = self.fe.wait_head_or_consumed(
            req.queue,
            req.head,
            std::time::Instant::now() + CONSUME_TIMEOUT,
        )?;
        let o = match early {
            Some(len) => {
                let status = match req.status_gpa {
                    Some(gpa) => Some(self.fe.mem().read_u8(gpa)?),
                    None => None,
                };
                let o = Outcome::Used { len, status };
                self.note(what, &o);
                self.check(what)?;
                o
            }
            None => {
                self.check(what)?;
                let o = self.fe.outcome(&req, GRACE)?;
                self.note(what, &o);
                o
            }
        };
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

    /// For a chain the device may either serve or refuse (e.g. an indirect
    /// descriptor when INDIRECT_DESC was not negotiated): returns the
    /// outcome after the usual checks, with the target sector treated as
    /// undefined until the caller updates the model.
    fn expect_refused_or_ok(&mut self, what: &str, req: Request) -> Result<Outcome> {
        self.model_unknown(VICTIM, 1);
        let o = self.fe.outcome(&req, DEFAULT_TIMEOUT)?;
        self.note(what, &o);
        self.check(what)?;
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
            ensure!(
                status.success(),
                "vubd exited with {status} on SIGTERM after `{what}`"
            );
        }
        Ok(())
    }
}

// ---- config space and negotiation ------------------------------------

/// The config space describes the image and the command line; vubd offers
/// the features and protocol features its contract lists.
#[test]
fn config_space_and_features() -> Result<()> {
    let h = Harness::start(Setup {
        queues: 2,
        ..Setup::default()
    })?;
    let c = h.cfg;
    eprintln!("[{:?}] config: {c:?}", h.target);
    ensure!(
        c.capacity == DISK_SIZE / SECTOR_SIZE,
        "capacity {} sectors, image has {}",
        c.capacity,
        DISK_SIZE / SECTOR_SIZE
    );
    if h.fe.has_feature(VIRTIO_BLK_F_BLK_SIZE) {
        ensure!(c.blk_size == 512, "blk_size {} (default 512)", c.blk_size);
    }
    if h.fe.has_feature(VIRTIO_BLK_F_MQ) {
        ensure!(
            c.num_queues == 2,
            "num_queues {} (started with 2)",
            c.num_queues
        );
    }
    if h.fe.has_feature(VIRTIO_BLK_F_SEG_MAX) {
        ensure!(c.seg_max >= 1, "seg_max 0");
    }
    if h.fe.has_feature(VIRTIO_BLK_F_SIZE_MAX) && h.target == Target::Vubd {
        ensure!(c.size_max >= 4096, "size_max {} below a page", c.size_max);
    }
    if h.fe.has_feature(VIRTIO_BLK_F_DISCARD) {
        ensure!(
            c.max_discard_sectors >= 1 && c.max_discard_seg >= 1 && c.discard_sector_alignment >= 1,
            "discard limits {c:?}"
        );
    }
    if h.fe.has_feature(VIRTIO_BLK_F_WRITE_ZEROES) {
        ensure!(
            c.max_write_zeroes_sectors >= 1 && c.max_write_zeroes_seg >= 1,
            "write-zeroes limits {c:?}"
        );
    }
    if h.target == Target::Vubd {
        let offered = h.fe.device_features();
        for (bit, name) in [
            (VIRTIO_F_VERSION_1, "VERSION_1"),
            (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
            (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
            (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
            (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
            (VIRTIO_BLK_F_FLUSH, "FLUSH"),
            (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
            (VIRTIO_BLK_F_DISCARD, "DISCARD"),
            (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
            (VIRTIO_BLK_F_MQ, "MQ"),
            (VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
            (VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        ] {
            ensure!(offered & (1u64 << bit) != 0, "vubd does not offer {name}");
        }
        ensure!(
            offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0,
            "no PROTOCOL_FEATURES"
        );
        ensure!(
            offered & (1u64 << VIRTIO_BLK_F_RO) == 0,
            "RO offered on a writable disk"
        );
        let pf = h.fe.protocol_features();
        for f in [
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::MQ,
            VhostUserProtocolFeatures::REPLY_ACK,
            VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        ] {
            ensure!(pf.contains(f), "protocol feature {f:?} not offered");
        }
    }
    h.finish("config")
}

/// Guest memory handed over either way (SET_MEM_TABLE as QEMU does,
/// ADD_MEM_REG as libblkio does) works, including buffers in the second
/// region above the hole.
#[test]
fn memory_table_modes() -> Result<()> {
    for mode in [MemMode::SetMemTable, MemMode::AddRegion] {
        let mut h = Harness::start(Setup {
            fe: Options {
                mem_mode: Some(mode),
                ..Options::default()
            },
            ..Setup::default()
        })?;
        let what = format!("I/O from the second region ({mode:?})");
        let data = fresh_data(1000, 4096);
        let src = REGION1_GPA + 0x1000;
        h.fe.mem().write(src, &data)?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, 64)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::r(src, 4096), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.model_write(64, &data);
        h.expect(&what, req, &[OK])?;
        let dst = REGION1_GPA + REGION1_SIZE - 4096;
        h.fe.mem().fill(dst, 4096, BUFFER_SENTINEL)?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, 64)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::w(dst, 4096), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.expect(&what, req, &[OK])?;
        ensure!(
            h.fe.mem().read(dst, 4096)? == data,
            "{what}: read back differs"
        );
        h.finish(&what)?;
    }
    Ok(())
}

// ---- descriptors pointing outside guest memory ------------------------

#[test]
fn descriptors_outside_guest_memory() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    let r0_end = REGION0_GPA + REGION0_SIZE;
    let r1_end = REGION1_GPA + REGION1_SIZE;
    let data_cases: [(&str, u64, u32); 7] = [
        ("in the hole between regions", HOLE_GPA, 512),
        ("above all memory", BEYOND_GPA, 512),
        ("straddling the end of region 0", r0_end - 256, 512),
        ("straddling the end of region 1", r1_end - 256, 512),
        ("wrapping around the address space", u64::MAX - 255, 512),
        ("starting one byte past region 0", r0_end, 512),
        ("huge length", REGION0_GPA + 0x20_0000, 0xFFFF_FE00),
    ];
    for (where_, addr, len) in data_cases {
        // Read: the device would write guest memory that is not there.
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, VICTIM)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::w(addr, len), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.expect(&format!("read, data buffer {where_}"), req, &[IOERR])?;
        // Write: the device would read guest memory that is not there and
        // must not put anything on the disk.
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::r(addr, len), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.expect(&format!("write, data buffer {where_}"), req, &[IOERR])?;
    }

    // A write whose second segment is bad: whether the first segment
    // reached the disk is not specified; record it.
    let good = h.fe.place_data(&fresh_data(77, 512))?;
    let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
    let st = h.fe.place_status()?;
    h.model_unknown(VICTIM, 2);
    let req = h.submit(
        &[
            Desc::r(hdr, 16),
            Desc::r(good, 512),
            Desc::r(HOLE_GPA, 512),
            Desc::w(st, 1),
        ],
        Some(st),
        None,
    )?;
    h.expect(
        "write, first segment fine, second in the hole",
        req,
        &[IOERR],
    )?;
    let partial = h.fe.read(VICTIM, 512)? != h.model[(VICTIM * SECTOR_SIZE) as usize..][..512];
    eprintln!(
        "[{:?}] ... first segment written before the failure: {partial}",
        h.target
    );

    // Header outside memory or cut by the region end: the status byte is
    // fine, so the answer is IOERR.
    for (where_, addr) in [
        ("in the hole", HOLE_GPA),
        ("straddling the end of region 0", r0_end - 8),
        ("above all memory", BEYOND_GPA),
    ] {
        let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(addr, 16), Desc::w(buf, 512), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.expect(&format!("header {where_}"), req, &[IOERR])?;
    }

    // Status byte outside memory (or cut by a region end): there is no
    // way to answer; the device must drop the chain, stay alive and keep
    // serving.
    for (where_, addr, len) in [
        ("in the hole", HOLE_GPA, 1),
        ("above all memory", BEYOND_GPA, 1),
        ("straddling the end of region 0", r0_end - 1, 2),
        ("wrapping around the address space", u64::MAX, 2),
    ] {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, VICTIM)?;
        let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::w(buf, 512), Desc::w(addr, len)],
            None,
            None,
        )?;
        h.expect_refused(&format!("read, status byte {where_}"), req, &[])?;
    }
    h.finish("outside memory")
}

// ---- broken chain structure ------------------------------------------

#[test]
fn broken_chains() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    let qsize = h.fe.queue_size(0)?;

    // Loop of three: header -> data -> status -> header ...
    {
        let s = h.fe.alloc_slots(0, 3)?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, VICTIM)?;
        let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        h.fe.write_desc(
            0,
            s[0],
            RawDesc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: s[1],
            },
        )?;
        h.fe.write_desc(
            0,
            s[1],
            RawDesc {
                addr: buf,
                len: 512,
                flags: F_WRITE | F_NEXT,
                next: s[2],
            },
        )?;
        h.fe.write_desc(
            0,
            s[2],
            RawDesc {
                addr: st,
                len: 1,
                flags: F_WRITE | F_NEXT,
                next: s[0],
            },
        )?;
        let req = h.publish_raw(s[0], Some(st))?;
        h.expect_refused("descriptor loop of three", req, &[])?;
    }
    // A descriptor chained to itself.
    {
        let s = h.fe.alloc_slots(0, 1)?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, VICTIM)?;
        h.fe.write_desc(
            0,
            s[0],
            RawDesc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: s[0],
            },
        )?;
        let req = h.publish_raw(s[0], None)?;
        h.expect_refused("descriptor chained to itself", req, &[])?;
    }
    // A write chain through every descriptor of the table and back to the
    // start (longer than the queue): it must not reach the disk.
    {
        let s = h.fe.alloc_slots(0, usize::from(qsize))?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
        let data = h.fe.place_data(&fresh_data(5, 512))?;
        let n = s.len();
        for i in 0..n {
            let (addr, len) = if i == 0 { (hdr, 16) } else { (data, 512) };
            h.fe.write_desc(
                0,
                s[i],
                RawDesc {
                    addr,
                    len,
                    flags: F_NEXT,
                    next: s[(i + 1) % n],
                },
            )?;
        }
        let req = h.publish_raw(s[0], None)?;
        h.expect_refused("write chain looping through the whole table", req, &[])?;
        // Same with a writable status in the loop.
        let s = h.fe.alloc_slots(0, usize::from(qsize))?;
        let st = h.fe.place_status()?;
        for i in 0..n {
            let (addr, len, flags) = match i {
                0 => (hdr, 16, F_NEXT),
                _ if i == n - 1 => (st, 1, F_WRITE | F_NEXT),
                _ => (data, 512, F_NEXT),
            };
            h.fe.write_desc(
                0,
                s[i],
                RawDesc {
                    addr,
                    len,
                    flags,
                    next: s[(i + 1) % n],
                },
            )?;
        }
        let req = h.publish_raw(s[0], Some(st))?;
        h.expect_refused(
            "write chain with status looping through the whole table",
            req,
            &[],
        )?;
    }
    // `next` outside the table.
    for next in [qsize, qsize + 5, u16::MAX] {
        let s = h.fe.alloc_slots(0, 1)?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
        h.fe.write_desc(
            0,
            s[0],
            RawDesc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next,
            },
        )?;
        let req = h.publish_raw(s[0], None)?;
        h.expect_refused(
            &format!("next index {next} outside a table of {qsize}"),
            req,
            &[],
        )?;
    }
    // `next` outside the table after a writable status.
    {
        let s = h.fe.alloc_slots(0, 2)?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_FLUSH, 0)?;
        let st = h.fe.place_status()?;
        h.fe.write_desc(
            0,
            s[0],
            RawDesc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: s[1],
            },
        )?;
        h.fe.write_desc(
            0,
            s[1],
            RawDesc {
                addr: st,
                len: 1,
                flags: F_WRITE | F_NEXT,
                next: qsize + 1,
            },
        )?;
        let req = h.publish_raw(s[0], Some(st))?;
        h.expect_refused("status descriptor chained out of the table", req, &[])?;
    }
    // Head index outside the table in the avail ring.
    for head in [qsize, qsize + 3, u16::MAX] {
        let req = h.publish_raw(head, None)?;
        h.expect_refused(
            &format!("avail ring entry {head} outside a table of {qsize}"),
            req,
            &[],
        )?;
        let bogus: Vec<UsedElem> =
            h.fe.unclaimed_used(0)?
                .into_iter()
                .filter(|e| e.id >= u32::from(qsize))
                .collect();
        ensure!(
            bogus.is_empty(),
            "device returned out-of-range ids: {bogus:?}"
        );
    }
    // Zero-length and header-only chains.
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, 0)?;
        let req = h.submit(&[Desc::r(hdr, 0)], None, None)?;
        h.expect_refused("single zero-length readable descriptor", req, &[])?;
        let w = h.fe.place_buffer(16, BUFFER_SENTINEL)?;
        let req = h.submit(&[Desc::w(w, 0)], None, None)?;
        h.expect_refused(
            "single zero-length writable descriptor",
            req,
            &[(w, vec![BUFFER_SENTINEL; 16])],
        )?;
        let req = h.submit(&[Desc::r(hdr, 16)], None, None)?;
        h.expect_refused("header only, nothing writable", req, &[])?;
        let req = h.submit(&[Desc::r(0, 0), Desc::w(0, 0)], None, None)?;
        h.expect_refused("two zero-length descriptors at address 0", req, &[])?;
    }
    // Readable descriptor after a writable one.
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
        let data = h.fe.place_data(&fresh_data(9, 512))?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::w(st, 1), Desc::r(data, 512)],
            Some(st),
            None,
        )?;
        h.expect_refused("write whose data follows the status", req, &[])?;
    }
    h.finish("broken chains")
}

// ---- wrong request shapes --------------------------------------------

#[test]
fn wrong_shapes() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    // No header at all.
    {
        let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        let req = h.submit(&[Desc::w(buf, 512), Desc::w(st, 1)], Some(st), None)?;
        h.expect("no header (only writable descriptors)", req, &[IOERR])?;
    }
    // Header too short, in one or two pieces.
    for pieces in [&[8u32][..], &[4, 8], &[15]] {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, VICTIM)?;
        let mut descs = Vec::new();
        let mut off = 0;
        for &p in pieces {
            descs.push(Desc::r(hdr + u64::from(off), p));
            off += p;
        }
        let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        descs.push(Desc::w(buf, 512));
        descs.push(Desc::w(st, 1));
        let req = h.submit(&descs, Some(st), None)?;
        h.expect(
            &format!("header of {off} bytes in {pieces:?}"),
            req,
            &[IOERR],
        )?;
        ensure!(
            h.fe.mem().read(buf, 512)? == vec![BUFFER_SENTINEL; 512],
            "short header: the device still read data into the buffer"
        );
    }
    // Header in a device-writable descriptor: nothing may be read into the
    // data buffer (the header says IN at VICTIM).
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, VICTIM)?;
        let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::w(hdr, 16), Desc::w(buf, 512), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.expect("header in a device-writable descriptor", req, &[IOERR])?;
        ensure!(
            h.fe.mem().read(buf, 512)? == vec![BUFFER_SENTINEL; 512],
            "header in a writable descriptor: the device still read data into the buffer"
        );
    }
    // Status descriptor missing.
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
        let data = h.fe.place_data(&fresh_data(11, 512))?;
        let req = h.submit(&[Desc::r(hdr, 16), Desc::r(data, 512)], None, None)?;
        h.expect_refused("write without status descriptor", req, &[])?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_FLUSH, 0)?;
        let req = h.submit(&[Desc::r(hdr, 16)], None, None)?;
        h.expect_refused("flush without status descriptor", req, &[])?;
    }
    // Status descriptor not writable: the device must not write it.
    bad_status_descriptor(&mut h, "read-only status", 12, |st| Desc::r(st, 1))?;
    // Status descriptor of length 0.
    bad_status_descriptor(&mut h, "zero-length status", 13, |st| Desc::w(st, 0))?;
    // Read data in a driver-readable descriptor: IOERR, buffer untouched.
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, VICTIM)?;
        let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::r(buf, 512), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.expect("read into a read-only buffer", req, &[IOERR])?;
        ensure!(
            h.fe.mem().read(buf, 512)? == vec![BUFFER_SENTINEL; 512],
            "the device wrote read data into a driver-readable buffer"
        );
    }
    // Write data in a device-writable descriptor: IOERR, disk untouched.
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
        let data = h.fe.place_data(&fresh_data(14, 512))?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::w(data, 512), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.expect("write from a device-writable buffer", req, &[IOERR])?;
    }
    // GET_ID into a driver-readable buffer.
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_GET_ID, 0)?;
        let buf = h.fe.place_buffer(20, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::r(buf, 20), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.expect("GET_ID into a read-only buffer", req, &[IOERR])?;
        ensure!(
            h.fe.mem().read(buf, 20)? == vec![BUFFER_SENTINEL; 20],
            "GET_ID wrote into a driver-readable buffer"
        );
    }
    h.finish("wrong shapes")
}

/// virtio 1.x: "the device MUST NOT make assumptions about the particular
/// arrangement of descriptors". These odd but legal layouts must work.
#[test]
fn legal_framing_is_accepted() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    let sector = 300;
    // Header split in two, data in three odd pieces.
    let data = fresh_data(21, 1024);
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, sector)?;
        let d = h.fe.place_data(&data)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[
                Desc::r(hdr, 8),
                Desc::r(hdr + 8, 8),
                Desc::r(d, 100),
                Desc::r(d + 100, 824),
                Desc::r(d + 924, 100),
                Desc::w(st, 1),
            ],
            Some(st),
            None,
        )?;
        h.model_write(sector, &data);
        h.expect(
            "write: header in 2 pieces, data in 3 odd pieces",
            req,
            &[OK],
        )?;
    }
    // Header and data in one readable descriptor.
    let data2 = fresh_data(22, 512);
    {
        let mut both = OutHdr::new(VIRTIO_BLK_T_OUT, sector + 2).bytes().to_vec();
        both.extend_from_slice(&data2);
        let d = h.fe.place_data(&both)?;
        let st = h.fe.place_status()?;
        let req = h.submit(&[Desc::r(d, 528), Desc::w(st, 1)], Some(st), None)?;
        h.model_write(sector + 2, &data2);
        h.expect("write: header and data in one descriptor", req, &[OK])?;
    }
    // Read with data and status in one writable descriptor.
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, sector)?;
        let buf = h.fe.place_buffer(1025, BUFFER_SENTINEL)?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::w(buf, 1025)],
            Some(buf + 1024),
            None,
        )?;
        h.expect("read: data and status in one descriptor", req, &[OK])?;
        ensure!(
            h.fe.mem().read(buf, 1024)? == data,
            "read back (data+status in one) differs"
        );
    }
    // Read into pieces whose sizes are not sector multiples.
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, sector + 2)?;
        let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[
                Desc::r(hdr, 16),
                Desc::w(buf, 1),
                Desc::w(buf + 1, 510),
                Desc::w(buf + 511, 1),
                Desc::w(st, 1),
            ],
            Some(st),
            None,
        )?;
        h.expect("read into pieces of 1, 510 and 1 bytes", req, &[OK])?;
        ensure!(
            h.fe.mem().read(buf, 512)? == data2,
            "read back (odd pieces) differs"
        );
    }
    // The WRITE flag on a descriptor that refers to an indirect table must
    // be ignored (virtio 1.x 2.7.5.3.2).
    if h.fe.has_feature(VIRTIO_RING_F_INDIRECT_DESC) {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, sector)?;
        let buf = h.fe.place_buffer(1024, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        let table = h.fe.write_table(&RawFrontend::link(
            &[Desc::r(hdr, 16), Desc::w(buf, 1024), Desc::w(st, 1)],
            &[0, 1, 2],
        ))?;
        let head = h.fe.submit_raw(
            0,
            RawDesc {
                addr: table,
                len: 48,
                flags: F_INDIRECT | F_WRITE,
                next: 0,
            },
        )?;
        let req = Request {
            queue: 0,
            head,
            status_gpa: Some(st),
            data_gpa: None,
            data_len: 0,
        };
        h.expect(
            "indirect descriptor that also carries the WRITE flag",
            req,
            &[OK],
        )?;
        ensure!(
            h.fe.mem().read(buf, 1024)? == data,
            "read back (indirect+WRITE) differs"
        );
    }
    h.finish("legal framing")
}

// ---- bad requests --------------------------------------------------------

#[test]
fn bad_requests() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    let cap = h.capacity();
    let last = cap - 1;
    // Reads out of range.
    for (what, sector, len) in [
        ("read at the first sector past the end", cap, 512u32),
        ("read running past the end", last, 1024),
        ("read far past the end", cap + 1_000_000, 512),
        (
            "read whose byte offset overflows u64",
            u64::MAX / 512 + 1,
            512,
        ),
        ("read at sector u64::MAX", u64::MAX, 512),
        ("read of 100 bytes", 8, 100),
        ("read of 513 bytes", 8, 513),
    ] {
        let req = h.fe.submit_read(0, sector, len)?;
        h.expect(what, req, &[IOERR])?;
    }
    // Writes out of range or of a bad length; the last sector and the file
    // size must survive.
    for (what, sector, len) in [
        ("write at the first sector past the end", cap, 512usize),
        ("write running past the end", last, 1024),
        (
            "write whose byte offset overflows u64",
            u64::MAX / 512 + 1,
            512,
        ),
        ("write at sector u64::MAX", u64::MAX, 512),
        ("write of 513 bytes", VICTIM, 513),
        ("write of 511 bytes", VICTIM, 511),
        ("write of 1 byte at the last sector", last, 1),
    ] {
        let req = h.fe.submit_write(0, sector, &fresh_data(31, len))?;
        h.expect(what, req, &[IOERR])?;
    }
    // Unknown or unoffered request types: UNSUPP, nothing written to the
    // buffer. (SCSI_CMD = 2, GET_LIFETIME = 10, SECURE_ERASE = 14,
    // ZONE_APPEND = 15, ZONE_REPORT = 16.)
    for t in [2u32, 3, 10, 14, 15, 16, 0x77, 0x8000_0000, u32::MAX] {
        let req = h.fe.submit_request(0, t, VICTIM, &[], 512)?;
        h.expect(&format!("request type {t:#x}"), req, &[UNSUPP])?;
        ensure!(
            h.fe.data(&req)? == vec![BUFFER_SENTINEL; 512],
            "request type {t:#x}: the device wrote into the buffer"
        );
    }
    // Flush carrying data (either direction): an error, never OK.
    let req =
        h.fe.submit_request(0, VIRTIO_BLK_T_FLUSH, 0, &fresh_data(32, 512), 0)?;
    h.expect("flush with a readable data buffer", req, &[IOERR, UNSUPP])?;
    let req = h.fe.submit_request(0, VIRTIO_BLK_T_FLUSH, 0, &[], 512)?;
    h.expect("flush with a writable data buffer", req, &[IOERR, UNSUPP])?;
    // A plain flush and a read at the last sector still work, with any
    // ioprio.
    let req = h.fe.submit_request(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0)?;
    h.expect("plain flush", req, &[OK])?;
    let hdr = h.fe.place_data(
        &OutHdr {
            type_: VIRTIO_BLK_T_IN,
            ioprio: u32::MAX,
            sector: last,
        }
        .bytes(),
    )?;
    let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
    let st = h.fe.place_status()?;
    let req = h.submit(
        &[Desc::r(hdr, 16), Desc::w(buf, 512), Desc::w(st, 1)],
        Some(st),
        Some((buf, 512)),
    )?;
    h.expect("read of the last sector with ioprio 0xffffffff", req, &[OK])?;
    ensure!(
        h.fe.data(&req)? == h.model[(last * SECTOR_SIZE) as usize..],
        "last sector reads back wrong"
    );
    h.finish("bad requests")
}

/// A request with more data segments than seg_max is refused.
#[test]
fn more_segments_than_seg_max() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    let qsize = h.fe.queue_size(0)?;
    let seg_max = if h.fe.has_feature(VIRTIO_BLK_F_SEG_MAX) {
        h.cfg.seg_max
    } else {
        0
    };
    ensure!(seg_max > 0, "{:?} does not advertise SEG_MAX", h.target);

    // seg_max + 1 data segments of one sector each: more than allowed.
    let n = seg_max as usize + 1;
    let data = h.fe.place_data(&fresh_data(41, 512))?;
    let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, 4096)?;
    let st = h.fe.place_status()?;
    let mut descs = vec![Desc::r(hdr, 16)];
    descs.extend(std::iter::repeat_n(Desc::r(data, 512), n));
    descs.push(Desc::w(st, 1));
    let head = if descs.len() <= usize::from(qsize) {
        h.fe.submit_chain(0, &descs)?
    } else {
        ensure!(
            h.fe.has_feature(VIRTIO_RING_F_INDIRECT_DESC),
            "need indirect descriptors"
        );
        h.fe.submit_indirect(0, &descs)?
    };
    let req = Request {
        queue: 0,
        head,
        status_gpa: Some(st),
        data_gpa: None,
        data_len: 0,
    };
    h.expect(
        &format!("write with seg_max + 1 = {n} segments"),
        req,
        &[IOERR],
    )?;
    h.finish("seg_max + 1 segments")
}

/// A request within the advertised limits (segments of size_max, at most
/// seg_max of them) is legal however large its total: the guest kernel
/// sizes its requests from these two values alone.
#[test]
fn large_request_within_limits() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    let seg_max = if h.fe.has_feature(VIRTIO_BLK_F_SEG_MAX) {
        h.cfg.seg_max
    } else {
        0
    };
    ensure!(seg_max > 0, "{:?} does not advertise SEG_MAX", h.target);
    // qsd offers SIZE_MAX with a value of 0; treat 0 as "no limit".
    let size_max = match h.cfg.size_max {
        n if n > 0 && h.fe.has_feature(VIRTIO_BLK_F_SIZE_MAX) => n,
        _ => 1 << 20,
    };
    // The largest request the limits allow in 8 segments (each size_max,
    // at most 1 MiB, all reading the same guest buffer): legal, so OK.
    let seg = size_max.min(1 << 20);
    let nseg = (seg_max as usize).min(8);
    let payload = fresh_data(42, seg as usize);
    let data = h.fe.place_data(&payload)?;
    let sector = 16 << 11; // 16 MiB in
    let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, sector)?;
    let st = h.fe.place_status()?;
    let mut descs = vec![Desc::r(hdr, 16)];
    descs.extend(std::iter::repeat_n(Desc::r(data, seg), nseg));
    descs.push(Desc::w(st, 1));
    let req = h.submit(&descs, Some(st), None)?;
    let what = format!(
        "write of {nseg} segments x {seg} bytes = {} KiB (seg_max {seg_max}, size_max {size_max})",
        nseg as u64 * u64::from(seg) / 1024
    );
    for i in 0..nseg as u64 {
        h.model_write(sector + i * u64::from(seg) / SECTOR_SIZE, &payload);
    }
    h.expect(&what, req, &[OK])?;
    h.finish("large request within limits")
}

/// GET_ID answers the --serial, NUL-padded to 20 bytes, truncated to a
/// smaller buffer, never writing past 20 bytes.
#[test]
fn get_id() -> Result<()> {
    if target() == Target::Qsd {
        eprintln!("SKIPPED: qsd has no --serial; GET_ID contents not checked");
        return Ok(());
    }
    for serial in ["hostile-serial-0123", "exactly-twenty-bytes", "x"] {
        let mut h = Harness::start(Setup {
            daemon_args: vec!["--serial".into(), serial.into()],
            ..Setup::default()
        })?;
        let mut want = serial.as_bytes().to_vec();
        want.resize(20, 0);
        let (o, buf) = h.fe.get_id(20)?;
        h.note(&format!("GET_ID (serial {serial:?}), 20-byte buffer"), &o);
        ensure!(o.status() == Some(OK), "GET_ID: {o}");
        ensure!(buf == want, "GET_ID returned {buf:02x?}, want {want:02x?}");
        let (o, buf) = h.fe.get_id(8)?;
        h.note(&format!("GET_ID (serial {serial:?}), 8-byte buffer"), &o);
        ensure!(o.status() == Some(OK), "GET_ID into 8 bytes: {o}");
        ensure!(buf == want[..8], "GET_ID into 8 bytes returned {buf:02x?}");
        let (o, buf) = h.fe.get_id(64)?;
        h.note(&format!("GET_ID (serial {serial:?}), 64-byte buffer"), &o);
        ensure!(o.status() == Some(OK), "GET_ID into 64 bytes: {o}");
        ensure!(
            buf[..20] == want,
            "GET_ID into 64 bytes returned {:02x?}",
            &buf[..20]
        );
        ensure!(
            buf[20..].iter().all(|&b| b == BUFFER_SENTINEL),
            "GET_ID wrote past 20 bytes: {:02x?}",
            &buf[20..]
        );
        h.check("GET_ID")?;
        h.finish("GET_ID")?;
    }
    Ok(())
}

// ---- discard and write-zeroes --------------------------------------------

#[test]
fn discard_and_write_zeroes() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    ensure!(
        h.fe.has_feature(VIRTIO_BLK_F_DISCARD) && h.fe.has_feature(VIRTIO_BLK_F_WRITE_ZEROES),
        "{:?} does not offer DISCARD and WRITE_ZEROES",
        h.target
    );
    let cap = h.capacity();
    let dwz = |h: &mut Harness, t: u32, segs: &[Segment]| -> Result<Request> {
        h.fe.submit_request(0, t, 0, &Segment::payload(segs), 0)
    };
    // Valid ones first.
    let req = dwz(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, &[Segment::new(200, 8)])?;
    h.model_write(200, &[0u8; 4096]);
    h.expect("write-zeroes of 8 sectors", req, &[OK])?;
    let req = dwz(
        &mut h,
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[Segment {
            sector: 216,
            num_sectors: 8,
            flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        }],
    )?;
    h.model_write(216, &[0u8; 4096]);
    h.expect("write-zeroes with UNMAP", req, &[OK])?;
    let req = dwz(&mut h, VIRTIO_BLK_T_DISCARD, &[Segment::new(400, 8)])?;
    h.model_unknown(400, 8);
    h.expect("discard of 8 sectors", req, &[OK])?;
    if h.cfg.max_discard_seg >= 2 {
        let req = dwz(
            &mut h,
            VIRTIO_BLK_T_DISCARD,
            &[Segment::new(416, 8), Segment::new(432, 8)],
        )?;
        h.model_unknown(416, 8);
        h.model_unknown(432, 8);
        h.expect("discard of two segments", req, &[OK])?;
    }
    if h.cfg.max_write_zeroes_seg >= 2 {
        let req = dwz(
            &mut h,
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[Segment::new(448, 1), Segment::new(450, 1)],
        )?;
        h.model_write(448, &[0u8; 512]);
        h.model_write(450, &[0u8; 512]);
        h.expect("write-zeroes of two segments", req, &[OK])?;
    }

    // Malformed segments; VICTIM and the last sector must survive.
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let name = if t == VIRTIO_BLK_T_DISCARD {
            "discard"
        } else {
            "write-zeroes"
        };
        let (max_seg, max_sectors) = if t == VIRTIO_BLK_T_DISCARD {
            (h.cfg.max_discard_seg, h.cfg.max_discard_sectors)
        } else {
            (h.cfg.max_write_zeroes_seg, h.cfg.max_write_zeroes_sectors)
        };
        let cases: Vec<(String, Vec<u8>, &[u8])> = vec![
            (
                "num_sectors 0".into(),
                Segment::payload(&[Segment::new(VICTIM, 0)]),
                &[IOERR, UNSUPP],
            ),
            (
                "sector past the end".into(),
                Segment::payload(&[Segment::new(cap, 1)]),
                &[IOERR],
            ),
            (
                "running past the end".into(),
                Segment::payload(&[Segment::new(cap - 1, 2)]),
                &[IOERR],
            ),
            (
                "sector u64::MAX".into(),
                Segment::payload(&[Segment::new(u64::MAX, 1)]),
                &[IOERR],
            ),
            (
                "sector + num_sectors overflowing".into(),
                Segment::payload(&[Segment::new(u64::MAX - 1, u32::MAX)]),
                &[IOERR],
            ),
            (
                "payload of 20 bytes (not a multiple of 16)".into(),
                {
                    let mut p = Segment::payload(&[Segment::new(VICTIM, 1)]);
                    p.extend_from_slice(&[0; 4]);
                    p
                },
                &[IOERR, UNSUPP],
            ),
            (
                "payload of 8 bytes".into(),
                Segment::payload(&[Segment::new(VICTIM, 1)])[..8].to_vec(),
                &[IOERR, UNSUPP],
            ),
            (
                format!("{} segments (max {max_seg})", max_seg + 1),
                Segment::payload(&vec![Segment::new(VICTIM, 1); max_seg as usize + 1]),
                &[IOERR, UNSUPP],
            ),
            (
                "valid segment then one past the end".into(),
                Segment::payload(&[Segment::new(VICTIM, 1), Segment::new(cap, 1)]),
                &[IOERR, UNSUPP],
            ),
            (
                "reserved flag bit 1".into(),
                Segment::payload(&[Segment {
                    sector: VICTIM,
                    num_sectors: 1,
                    flags: 2,
                }]),
                &[UNSUPP],
            ),
            (
                "reserved flag bit 31".into(),
                Segment::payload(&[Segment {
                    sector: VICTIM,
                    num_sectors: 1,
                    flags: 1 << 31,
                }]),
                &[UNSUPP],
            ),
        ];
        let mut cases = cases;
        if u64::from(max_sectors) < cap {
            cases.push((
                format!("{} sectors (max {max_sectors})", max_sectors + 1),
                Segment::payload(&[Segment::new(0, max_sectors + 1)]),
                &[IOERR, UNSUPP],
            ));
        }
        if t == VIRTIO_BLK_T_DISCARD {
            // virtio 1.x 5.2.6.2: UNSUPP for a discard with the unmap flag.
            cases.push((
                "UNMAP flag".into(),
                Segment::payload(&[Segment {
                    sector: VICTIM,
                    num_sectors: 1,
                    flags: 1,
                }]),
                &[UNSUPP],
            ));
        }
        for (what, payload, want) in cases {
            let what = format!("{name}: {what}");
            if what.contains("valid segment then") {
                // Whether the valid first segment was applied is not
                // specified; do not hold it against the device.
                h.model_unknown(VICTIM, 1);
            }
            let req = h.fe.submit_request(0, t, 0, &payload, 0)?;
            h.expect(&what, req, want)?;
        }
        // No segment at all.
        let req = h.fe.submit_request(0, t, 0, &[], 0)?;
        h.expect(
            &format!("{name} without any segment"),
            req,
            &[IOERR, UNSUPP],
        )?;
        // Segment in a device-writable descriptor.
        let hdr = h.fe.place_header(t, 0)?;
        let seg = h.fe.place_data(&Segment::new(VICTIM, 1).bytes())?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::w(seg, 16), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        h.expect(
            &format!("{name} with its segment in a writable descriptor"),
            req,
            &[IOERR],
        )?;
    }
    h.finish("discard/write-zeroes")
}

// ---- read-only device ----------------------------------------------------

#[test]
fn readonly_refuses_writes() -> Result<()> {
    if target() == Target::Qsd {
        eprintln!("SKIPPED: read-only qsd not wired up");
        return Ok(());
    }
    let mut h = Harness::start(Setup {
        readonly: true,
        ..Setup::default()
    })?;
    ensure!(
        h.fe.device_features() & (1 << VIRTIO_BLK_F_RO) != 0,
        "--readonly vubd does not offer VIRTIO_BLK_F_RO"
    );
    let req = h.fe.submit_write(0, VICTIM, &fresh_data(51, 4096))?;
    h.expect("write on a read-only disk", req, &[IOERR])?;
    let req = h.fe.submit_write(0, 0, &fresh_data(52, 512))?;
    h.expect("write of sector 0 on a read-only disk", req, &[IOERR])?;
    for (t, name) in [
        (VIRTIO_BLK_T_DISCARD, "discard"),
        (VIRTIO_BLK_T_WRITE_ZEROES, "write-zeroes"),
    ] {
        let req =
            h.fe.submit_request(0, t, 0, &Segment::payload(&[Segment::new(VICTIM, 8)]), 0)?;
        h.expect(
            &format!("{name} on a read-only disk"),
            req,
            &[IOERR, UNSUPP],
        )?;
    }
    let got = h.fe.read(VICTIM, 4096)?;
    ensure!(
        got == h.model[(VICTIM * SECTOR_SIZE) as usize..][..4096],
        "read-only disk reads back wrong"
    );
    h.finish("read-only")
}

/// With 4096-byte logical blocks, I/O that is not block aligned is refused.
#[test]
fn logical_block_size_4096() -> Result<()> {
    if target() == Target::Qsd {
        eprintln!("SKIPPED: qsd block size not configurable here");
        return Ok(());
    }
    let mut h = Harness::start(Setup {
        daemon_args: vec!["--logical-block-size".into(), "4096".into()],
        ..Setup::default()
    })?;
    ensure!(h.cfg.blk_size == 4096, "blk_size {}", h.cfg.blk_size);
    ensure!(
        h.cfg.capacity == DISK_SIZE / SECTOR_SIZE,
        "capacity {}",
        h.cfg.capacity
    );
    let req = h.fe.submit_write(0, VICTIM + 1, &fresh_data(61, 4096))?;
    h.expect("4 KiB write at a sector not 4 KiB aligned", req, &[IOERR])?;
    let req = h.fe.submit_write(0, VICTIM - 4, &fresh_data(62, 512))?;
    h.expect("512-byte write on a 4 KiB-block disk", req, &[IOERR])?;
    let req = h.fe.submit_read(0, 8, 1024)?;
    h.expect("1 KiB read on a 4 KiB-block disk", req, &[IOERR])?;
    for (t, name) in [
        (VIRTIO_BLK_T_DISCARD, "discard"),
        (VIRTIO_BLK_T_WRITE_ZEROES, "write-zeroes"),
    ] {
        for (what, seg) in [
            ("at a sector not 4 KiB aligned", Segment::new(VICTIM + 1, 8)),
            ("of 3 sectors", Segment::new(VICTIM - 4, 3)),
        ] {
            let req = h.fe.submit_request(0, t, 0, &Segment::payload(&[seg]), 0)?;
            h.expect(
                &format!("{name} {what} on a 4 KiB-block disk"),
                req,
                &[IOERR],
            )?;
        }
    }
    let data = fresh_data(63, 8192);
    let req = h.fe.submit_write(0, 4096, &data)?;
    h.model_write(4096, &data);
    h.expect("aligned 8 KiB write", req, &[OK])?;
    h.finish("4096-byte blocks")
}

// ---- indirect descriptors ------------------------------------------------

#[test]
fn indirect_descriptors() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    ensure!(
        h.fe.has_feature(VIRTIO_RING_F_INDIRECT_DESC),
        "{:?} does not offer RING_INDIRECT_DESC",
        h.target
    );
    let r0_end = REGION0_GPA + REGION0_SIZE;
    // Well-formed: write then read 8 KiB in 4 segments through tables.
    let data = fresh_data(71, 8192);
    let sector = 600;
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, sector)?;
        let d = h.fe.place_data(&data)?;
        let st = h.fe.place_status()?;
        let mut descs = vec![Desc::r(hdr, 16)];
        descs.extend((0..4).map(|i| Desc::r(d + i * 2048, 2048)));
        descs.push(Desc::w(st, 1));
        let head = h.fe.submit_indirect(0, &descs)?;
        let req = Request {
            queue: 0,
            head,
            status_gpa: Some(st),
            data_gpa: None,
            data_len: 0,
        };
        h.model_write(sector, &data);
        h.expect("indirect write of 8 KiB", req, &[OK])?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, sector)?;
        let buf = h.fe.place_buffer(8192, BUFFER_SENTINEL)?;
        let st = h.fe.place_status()?;
        let head =
            h.fe.submit_indirect(0, &[Desc::r(hdr, 16), Desc::w(buf, 8192), Desc::w(st, 1)])?;
        let req = Request {
            queue: 0,
            head,
            status_gpa: Some(st),
            data_gpa: Some(buf),
            data_len: 8192,
        };
        h.expect("indirect read of 8 KiB", req, &[OK])?;
        ensure!(h.fe.data(&req)? == data, "indirect read back differs");
    }
    // Nested indirect table.
    {
        let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
        let d = h.fe.place_data(&fresh_data(72, 512))?;
        let st = h.fe.place_status()?;
        let inner = h.fe.write_table(&[RawDesc {
            addr: d,
            len: 512,
            flags: 0,
            next: 0,
        }])?;
        let table = h.fe.write_table(&[
            RawDesc {
                addr: hdr,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: inner,
                len: 16,
                flags: F_INDIRECT | F_NEXT,
                next: 2,
            },
            RawDesc {
                addr: st,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        ])?;
        let head = h.fe.submit_raw(
            0,
            RawDesc {
                addr: table,
                len: 48,
                flags: F_INDIRECT,
                next: 0,
            },
        )?;
        let req = Request {
            queue: 0,
            head,
            status_gpa: Some(st),
            data_gpa: None,
            data_len: 0,
        };
        h.expect_refused("indirect table nested in an indirect table", req, &[])?;
    }
    // Malformed tables: bad length, outside memory, bad links.
    let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
    let d = h.fe.place_data(&fresh_data(73, 512))?;
    let st = h.fe.place_status()?;
    let good_table = RawFrontend::link(
        &[Desc::r(hdr, 16), Desc::r(d, 512), Desc::w(st, 1)],
        &[0, 1, 2],
    );
    let table = h.fe.write_table(&good_table)?;
    let mut loop_table = good_table.clone();
    loop_table[2].flags |= F_NEXT;
    loop_table[2].next = 0;
    let looped = h.fe.write_table(&loop_table)?;
    let mut oob_table = good_table.clone();
    oob_table[0].next = 7;
    let oob = h.fe.write_table(&oob_table)?;
    let straddle = r0_end - 32;
    h.fe.mem().write(straddle, &good_table[0].bytes())?;
    h.fe.mem().write(straddle + 16, &good_table[1].bytes())?;
    let zeros = h.fe.place_buffer(0x10_0000, 0)?;
    for (what, addr, len) in [
        ("length 40, not a multiple of 16", table, 40u32),
        ("length 8", table, 8),
        ("length 0", table, 0),
        ("in the hole between regions", HOLE_GPA, 48),
        ("above all memory", BEYOND_GPA, 48),
        ("straddling the end of region 0", straddle, 48),
        ("at an address that wraps around", u64::MAX - 15, 48),
        ("whose entries loop", looped, 48),
        ("whose first entry links past the table", oob, 48),
        ("of 65536 zeroed entries", zeros, 0x10_0000),
        ("of 4095 zeroed entries", zeros, 0xFFF0),
    ] {
        let head = h.fe.submit_raw(
            0,
            RawDesc {
                addr,
                len,
                flags: F_INDIRECT,
                next: 0,
            },
        )?;
        // The status byte is shared by these cases; reset it each time.
        h.fe.mem().fill(st, 1, STATUS_SENTINEL)?;
        let req = Request {
            queue: 0,
            head,
            status_gpa: Some(st),
            data_gpa: None,
            data_len: 0,
        };
        h.expect_refused(&format!("indirect table {what}"), req, &[])?;
    }
    // A table longer than the queue: qsize + 10 entries of 512-byte
    // segments (also more than seg_max).
    {
        let qsize = usize::from(h.fe.queue_size(0)?);
        let mut descs = vec![Desc::r(hdr, 16)];
        descs.extend(std::iter::repeat_n(Desc::r(d, 512), qsize + 8));
        let st2 = h.fe.place_status()?;
        descs.push(Desc::w(st2, 1));
        let head = h.fe.submit_indirect(0, &descs)?;
        let req = Request {
            queue: 0,
            head,
            status_gpa: Some(st2),
            data_gpa: None,
            data_len: 0,
        };
        h.expect_refused(
            &format!(
                "indirect chain of {} descriptors (queue {qsize})",
                qsize + 10
            ),
            req,
            &[],
        )?;
    }
    h.finish("indirect")
}

// ---- corrupted avail ring ------------------------------------------------

/// avail->idx jumping far ahead (more entries than the queue holds) must
/// not crash vubd nor touch the disk. It may stop serving the queue; a new
/// session must work. What happens to the queue is printed.
#[test]
fn avail_index_far_ahead() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    let qsize = h.fe.queue_size(0)?;
    for jump in [qsize + 1, qsize + 100, 0x8000, u16::MAX] {
        let what = format!("avail->idx jumping {jump} entries ahead (queue {qsize})");
        h.good_io(&what)?;
        let before = h.fe.avail_idx(0)?;
        let used_before = h.fe.used_idx(0)?;
        h.fe.set_avail_idx(0, before.wrapping_add(jump))?;
        std::thread::sleep(Duration::from_millis(300));
        h.alive(&what)?;
        let used_after = h.fe.used_idx(0)?;
        eprintln!(
            "[{:?}] {what}: used->idx {used_before} -> {used_after} ({} entries completed)",
            h.target,
            used_after.wrapping_sub(used_before)
        );
        h.fe.mem().check_guards()?;
        h.check_disk(&what)?;
        // Put the index back and see whether the queue still serves.
        h.fe.set_avail_idx(0, before)?;
        let req = h.fe.submit_read(0, VICTIM, 512)?;
        let o = h.fe.outcome(&req, Duration::from_secs(2))?;
        eprintln!(
            "[{:?}] ... after restoring avail->idx, a read is {o}",
            h.target
        );
        // A new session always works.
        h.reconnect()?;
        h.check(&format!("new session after {what}"))?;
    }
    h.finish("avail index")
}

// ---- hostile control messages --------------------------------------------

/// vhost-user messages with impossible values are refused (a NACK or a
/// closed connection), without a crash; the next session works.
#[test]
fn hostile_control_messages() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    type Case = (&'static str, fn(&mut RawFrontend) -> vhost::Result<()>);
    // (GET_CONFIG past the config space is not tried: the backend's
    // zero-size error reply is legal, but the vhost crate's frontend then
    // waits forever for the payload it asked for.)
    let cases: [Case; 5] = [
        ("SET_VRING_NUM 0", |fe| fe.vhost().set_vring_num(0, 0)),
        ("SET_VRING_NUM 32768", |fe| {
            fe.vhost().set_vring_num(0, 32768)
        }),
        ("SET_VRING_ADDR outside guest memory", |fe| {
            let c = VringConfigData {
                queue_max_size: 256,
                queue_size: 256,
                flags: 0,
                desc_table_addr: 0x10,
                used_ring_addr: 0x2000,
                avail_ring_addr: 0x1000,
                log_addr: None,
            };
            fe.vhost().set_vring_addr(0, &c)
        }),
        (
            "ADD_MEM_REG with an offset past the end of the file",
            |fe| {
                let mut info = fe.mem().region_infos()[0];
                info.guest_phys_addr = 0x1_0000_0000;
                info.mmap_offset = 1 << 40;
                info.userspace_addr = 0x7000_0000_0000;
                fe.vhost().add_mem_region(&info).map(|_| ())
            },
        ),
        ("ADD_MEM_REG overlapping an existing region", |fe| {
            let mut info = fe.mem().region_infos()[1];
            info.guest_phys_addr = REGION0_GPA + 0x1000;
            info.userspace_addr += 0x1000;
            fe.vhost().add_mem_region(&info).map(|_| ())
        }),
    ];
    for (what, f) in cases {
        let res = f(&mut h.fe);
        eprintln!(
            "[{:?}] {what}: {:?}",
            h.target,
            res.as_ref().map(|_| "accepted")
        );
        std::thread::sleep(Duration::from_millis(100));
        h.alive(what)?;
        if what.starts_with("SET_VRING_NUM") || what.starts_with("SET_VRING_ADDR") {
            ensure!(res.is_err(), "`{what}` was accepted");
        }
        h.reconnect()?;
        h.check(&format!("new session after {what}"))?;
    }
    h.finish("control messages")
}

/// A memory region whose file range runs past the end of its file: the
/// backend can map it, but touching the part past the end raises SIGBUS.
/// vubd must refuse the region (ADD_MEM_REG) or fail the request, and
/// stay alive.
#[test]
fn memory_region_past_end_of_file() -> Result<()> {
    let mut h = Harness::start(Setup::default())?;
    const GPA: u64 = 1 << 30;
    let mut info = h.fe.mem().region_infos()[1];
    // The memfd is 9 MiB: this region's second MiB lies past its end.
    info.guest_phys_addr = GPA;
    info.mmap_offset = 8 << 20;
    info.memory_size = 2 << 20;
    info.userspace_addr = 0x7e00_0000_0000;
    let res = h.fe.vhost().add_mem_region(&info);
    eprintln!(
        "[{:?}] ADD_MEM_REG past the end of the file: {:?}",
        h.target,
        res.as_ref().map(|_| "accepted")
    );
    std::thread::sleep(Duration::from_millis(100));
    h.alive("ADD_MEM_REG past the end of the file")?;
    if res.is_ok() {
        for (what, t, flags) in [
            (
                "write from guest memory past the end of the memfd",
                VIRTIO_BLK_T_OUT,
                0,
            ),
            (
                "read into guest memory past the end of the memfd",
                VIRTIO_BLK_T_IN,
                F_WRITE,
            ),
        ] {
            let hdr = h.fe.place_header(t, VICTIM)?;
            let st = h.fe.place_status()?;
            let data = Desc {
                addr: GPA + (1 << 20) + 4096,
                len: 512,
                flags,
            };
            let req = h.submit(&[Desc::r(hdr, 16), data, Desc::w(st, 1)], Some(st), None)?;
            let o = h.fe.outcome(&req, DEFAULT_TIMEOUT)?;
            h.note(what, &o);
            if let Some(status) = h.daemon.try_wait()? {
                bail!("{:?} died on `{what}`: {status}", h.target);
            }
            ensure!(
                o.status() == Some(IOERR),
                "`{what}`: expected IOERR, got {o}"
            );
            h.check(what)?;
        }
        // Pieces the device copies itself rather than handing to the
        // kernel: header, GET_ID answer, status byte, indirect table.
        let bad = GPA + (1 << 20) + 8192;
        let st = h.fe.place_status()?;
        let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
        let req = h.submit(
            &[Desc::r(bad, 16), Desc::w(buf, 512), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        expect_alive_ioerr(&mut h, "header past the end of the memfd", req)?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_GET_ID, 0)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::w(bad, 20), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        expect_alive_ioerr(&mut h, "GET_ID answer past the end of the memfd", req)?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_DISCARD, 0)?;
        let st = h.fe.place_status()?;
        let req = h.submit(
            &[Desc::r(hdr, 16), Desc::r(bad, 16), Desc::w(st, 1)],
            Some(st),
            None,
        )?;
        expect_alive_ioerr(&mut h, "discard segment past the end of the memfd", req)?;
        let hdr = h.fe.place_header(VIRTIO_BLK_T_FLUSH, 0)?;
        let req = h.submit(&[Desc::r(hdr, 16), Desc::w(bad, 1)], None, None)?;
        let what = "status byte past the end of the memfd";
        let o = h.fe.outcome(&req, Duration::from_secs(2))?;
        h.note(what, &o);
        if let Some(status) = h.daemon.try_wait()? {
            bail!("{:?} died on `{what}`: {status}", h.target);
        }
        h.check(what)?;
        if h.fe.has_feature(VIRTIO_RING_F_INDIRECT_DESC) {
            let st = h.fe.place_status()?;
            let head = h.fe.submit_raw(
                0,
                RawDesc {
                    addr: bad,
                    len: 48,
                    flags: F_INDIRECT,
                    next: 0,
                },
            )?;
            let req = Request {
                queue: 0,
                head,
                status_gpa: Some(st),
                data_gpa: None,
                data_len: 0,
            };
            let what = "indirect table past the end of the memfd";
            let o = h.fe.outcome(&req, Duration::from_secs(2))?;
            h.note(what, &o);
            if let Some(status) = h.daemon.try_wait()? {
                bail!("{:?} died on `{what}`: {status}", h.target);
            }
            h.check(what)?;
        }
    } else {
        h.reconnect()?;
    }
    h.finish("region past the end of its file")
}

/// A write and a read whose status descriptor is `status(addr)`, one the
/// device cannot answer through: both refused, the status byte untouched,
/// and a read never reported OK.
fn bad_status_descriptor(
    h: &mut Harness,
    what: &str,
    seed: u64,
    status: impl Fn(u64) -> Desc,
) -> Result<()> {
    let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
    let data = h.fe.place_data(&fresh_data(seed, 512))?;
    let st = h.fe.place_status()?;
    let watch = [h.snap(st, 1)?];
    let req = h.submit(
        &[Desc::r(hdr, 16), Desc::r(data, 512), status(st)],
        None,
        None,
    )?;
    h.expect_refused(&format!("write with a {what} descriptor"), req, &watch)?;

    let hdr = h.fe.place_header(VIRTIO_BLK_T_IN, VICTIM)?;
    let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
    let st = h.fe.place_status()?;
    let watch = [h.snap(st, 1)?];
    let req = h.submit(
        &[Desc::r(hdr, 16), Desc::w(buf, 512), status(st)],
        None,
        None,
    )?;
    let o = h.expect_refused(&format!("read with a {what} descriptor"), req, &watch)?;
    // Read as "data 511 bytes + status in the last byte" it is still an
    // error; in no reading may it be OK.
    if matches!(o, Outcome::Used { .. }) {
        let last = h.fe.mem().read_u8(buf + 511)?;
        ensure!(
            last != OK && !(0x10..0x80).contains(&last),
            "read with a {what}: the device read data and reported {last:#04x}"
        );
    }
    Ok(())
}

fn expect_alive_ioerr(h: &mut Harness, what: &str, req: Request) -> Result<()> {
    let o = h.fe.outcome(&req, DEFAULT_TIMEOUT)?;
    h.note(what, &o);
    if let Some(status) = h.daemon.try_wait()? {
        bail!("{:?} died on `{what}`: {status}", h.target);
    }
    ensure!(
        o.status() == Some(IOERR),
        "`{what}`: expected IOERR, got {o}"
    );
    h.check(what)
}

/// A frontend offers its memory in a memfd not sealed against shrinking,
/// cuts the memfd after handing it over (region 1 lies in the cut-off
/// part), then submits a request whose header lies there: any access by
/// the backend would raise SIGBUS. vubd refuses such memory (it serves
/// memfds sealed with F_SEAL_SHRINK, as QEMU's memory-backend-memfd creates
/// them by default), stays alive and serves the next frontend. With
/// SET_MEM_TABLE (QEMU's way) and ADD_MEM_REG (libblkio's).
#[test]
fn memfd_shrunk_after_setup() -> Result<()> {
    for mode in [MemMode::SetMemTable, MemMode::AddRegion] {
        memfd_shrunk_after_setup_with(mode).with_context(|| format!("memory sent by {mode:?}"))?;
    }
    Ok(())
}

fn memfd_shrunk_after_setup_with(mode: MemMode) -> Result<()> {
    let mut h = Harness::start(Setup {
        fe: Options {
            mem_mode: Some(mode),
            ..Options::default()
        },
        ..Setup::default()
    })?;
    h.good_io("a sealed memfd")?;
    h.fe.disconnect();
    h.fe_opts.unsealed_memory = true;
    let what = "header in a region cut off by shrinking an unsealed memfd";
    match RawFrontend::connect(&h.socket, h.fe_opts) {
        Err(e) => eprintln!("[{:?}] unsealed memfd refused: {e:#}", h.target),
        Ok(fe) => {
            h.fe = fe;
            let hdr = REGION1_GPA + 0x1000;
            h.fe.mem()
                .write(hdr, &OutHdr::new(VIRTIO_BLK_T_IN, VICTIM).bytes())?;
            // Region 1 is file offset 6..8 MiB: cut the file at 6 MiB.
            h.fe.mem().set_file_len(6 << 20)?;
            let buf = h.fe.place_buffer(512, BUFFER_SENTINEL)?;
            let st = h.fe.place_status()?;
            let req = h.submit(
                &[Desc::r(hdr, 16), Desc::w(buf, 512), Desc::w(st, 1)],
                Some(st),
                None,
            )?;
            let o = h.fe.outcome(&req, Duration::from_secs(3))?;
            h.note(what, &o);
        }
    }
    h.alive(what)?;
    h.fe_opts.unsealed_memory = false;
    h.reconnect()?;
    h.finish(what)
}

/// `--allow-unsealed-memory` serves a frontend that cannot seal its memory
/// (libblkio's memfds, QEMU's memory-backend-file), trusting it not to cut
/// the file.
#[test]
fn unsealed_memory_served_when_allowed() -> Result<()> {
    let mut h = Harness::start(Setup {
        daemon_args: vec!["--allow-unsealed-memory".into()],
        fe: Options {
            unsealed_memory: true,
            ..Options::default()
        },
        ..Setup::default()
    })?;
    h.good_io("unsealed memfd with --allow-unsealed-memory")?;
    h.finish("unsealed memory allowed")
}

/// A queue the frontend broke (avail->idx far ahead, chains refused) does
/// not disturb the other queue; once repaired it serves again.
#[test]
fn multiqueue_isolation() -> Result<()> {
    multiqueue_isolation_with(&[])
}

/// The same with both queues on one worker thread (one shared ring), and
/// with the sync engine polling them: the broken queue must neither starve
/// the good one nor keep the poll spinning on it.
#[test]
fn multiqueue_isolation_on_one_thread() -> Result<()> {
    multiqueue_isolation_with(&["--threads", "1"])?;
    multiqueue_isolation_with(&["--threads", "1", "--aio", "sync", "--poll-us", "50"])
}

fn multiqueue_isolation_with(daemon_args: &[&str]) -> Result<()> {
    let mut h = Harness::start(Setup {
        daemon_args: daemon_args.iter().map(|a| a.to_string()).collect(),
        queues: 2,
        fe: Options {
            num_queues: 2,
            ..Options::default()
        },
        ..Setup::default()
    })?;
    let qsize = h.fe.queue_size(1)?;
    // A bad request on queue 1, answered there.
    let req = h.fe.submit_read(1, h.capacity(), 512)?;
    h.expect("read past the end on queue 1", req, &[IOERR])?;
    // Queue 1 corrupted; queue 0 (used by the checks) must keep working,
    // and the daemon must not spin on the broken queue meanwhile.
    let before = h.fe.avail_idx(1)?;
    h.fe.set_avail_idx(1, before.wrapping_add(qsize + 7))?;
    h.check("queue 1's avail->idx far ahead")?;
    wait_asleep(h.daemon.pid()).context("with a broken, idle queue")?;
    h.fe.set_avail_idx(1, before)?;
    let req = h.fe.submit_read(1, VICTIM, 512)?;
    let o = h.fe.outcome(&req, DEFAULT_TIMEOUT)?;
    h.note("read on queue 1 after restoring its avail->idx", &o);
    ensure!(o.status() == Some(OK), "queue 1 did not recover: {o}");
    ensure!(
        h.fe.data(&req)? == h.model[(VICTIM * SECTOR_SIZE) as usize..][..512],
        "queue 1 read back wrong"
    );
    h.finish("multiqueue")
}

/// Waits (up to 10 s, against hangs) until every thread of process `pid`
/// sleeps, and stays so for 5 samples 50 ms apart; vhost-user-backend's
/// queue threads (`vring_worker`) must sleep in epoll. A thread spinning on
/// a queue is never seen asleep there, however loaded the machine: no
/// timing threshold decides.
fn wait_asleep(pid: u32) -> Result<()> {
    let asleep = || -> Result<bool> {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let dir = task?.path();
            let stat = std::fs::read_to_string(dir.join("stat"))?;
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            if state.starts_with('R') {
                return Ok(false);
            }
            let comm = std::fs::read_to_string(dir.join("comm"))?;
            let wchan = std::fs::read_to_string(dir.join("wchan"))?;
            if comm.trim() == "vring_worker" && !wchan.contains("epoll") {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let t0 = std::time::Instant::now();
    let mut streak = 0;
    while streak < 5 {
        streak = if asleep()? { streak + 1 } else { 0 };
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "a thread of the daemon keeps running (spinning?)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Without EVENT_IDX and INDIRECT_DESC negotiated the device still serves
/// and still refuses malformed chains.
#[test]
fn without_optional_ring_features() -> Result<()> {
    let mut h = Harness::start(Setup {
        fe: Options {
            event_idx: false,
            indirect: false,
            ..Options::default()
        },
        ..Setup::default()
    })?;
    ensure!(
        !h.fe.has_feature(VIRTIO_RING_F_EVENT_IDX)
            && !h.fe.has_feature(VIRTIO_RING_F_INDIRECT_DESC)
    );
    let req =
        h.fe.submit_write(0, h.capacity() - 1, &fresh_data(81, 1024))?;
    h.expect("write running past the end (no EVENT_IDX)", req, &[IOERR])?;
    let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
    let req = h.submit(&[Desc::r(hdr, 16), Desc::r(HOLE_GPA, 512)], None, None)?;
    h.expect_refused(
        "write without status, data in the hole (no EVENT_IDX)",
        req,
        &[],
    )?;
    // An indirect descriptor although INDIRECT_DESC was not negotiated.
    let hdr = h.fe.place_header(VIRTIO_BLK_T_OUT, VICTIM)?;
    let d = h.fe.place_data(&fresh_data(82, 512))?;
    let st = h.fe.place_status()?;
    let table = h.fe.write_table(&RawFrontend::link(
        &[Desc::r(hdr, 16), Desc::r(d, 512), Desc::w(st, 1)],
        &[0, 1, 2],
    ))?;
    let head = h.fe.submit_raw(
        0,
        RawDesc {
            addr: table,
            len: 48,
            flags: F_INDIRECT,
            next: 0,
        },
    )?;
    let req = Request {
        queue: 0,
        head,
        status_gpa: Some(st),
        data_gpa: None,
        data_len: 0,
    };
    let o = h.expect_refused_or_ok("indirect descriptor without INDIRECT_DESC negotiated", req)?;
    if o.status() == Some(OK) {
        h.model_write(VICTIM, &h.fe.mem().read(d, 512)?);
    }
    h.finish("no optional ring features")
}

/// The write cache mode comes from what this session's driver negotiated:
/// write-back with FLUSH, write-through without (a driver that cannot flush
/// must never be left with a volatile cache), and a new session starts
/// from that default, not from what the previous guest set.
#[test]
fn write_cache_follows_the_negotiated_features() -> Result<()> {
    if target() != Target::Vubd {
        eprintln!("SKIPPED: checks vubd's negotiation only");
        return Ok(());
    }
    let mut h = Harness::start(Setup::default())?;
    ensure!(h.fe.has_feature(VIRTIO_BLK_F_FLUSH) && h.fe.has_feature(VIRTIO_BLK_F_CONFIG_WCE));
    ensure!(
        h.fe.config()?.wce == 1,
        "FLUSH negotiated: write-back expected"
    );
    h.fe.set_wce(false)?;
    ensure!(
        h.fe.config()?.wce == 0,
        "the driver's switch to write-through was ignored"
    );
    h.good_io("write-through writes")?;

    h.reconnect()?;
    ensure!(
        h.fe.config()?.wce == 1,
        "a new session inherited the previous guest's write-through"
    );

    h.fe_opts.withhold = 1 << VIRTIO_BLK_F_FLUSH;
    h.reconnect()?;
    ensure!(!h.fe.has_feature(VIRTIO_BLK_F_FLUSH));
    ensure!(
        h.fe.config()?.wce == 0,
        "write-back although the driver cannot flush"
    );
    // Turning write-back on needs FLUSH.
    h.fe.set_wce(true)?;
    ensure!(h.fe.config()?.wce == 0, "write-back without FLUSH");
    h.good_io("writes without FLUSH")?;

    h.fe_opts.withhold = 1 << VIRTIO_BLK_F_CONFIG_WCE;
    h.reconnect()?;
    ensure!(h.fe.config()?.wce == 1);
    h.fe.set_wce(false)?;
    ensure!(
        h.fe.config()?.wce == 1,
        "wce written without CONFIG_WCE negotiated"
    );
    h.finish("write cache mode")
}

/// One queue's huge WRITE_ZEROES must not hold up another queue served by
/// the same thread (`--threads 1 --queues 2`). 1 GiB without UNMAP on a
/// sparse tmpfs image (tmpfs has no FALLOC_FL_ZERO_RANGE, so zeroes are
/// written): the image's allocation shows how far it got. Once it is under
/// way, the daemon is frozen (SIGSTOP) with most of the zeroing left, a
/// read is queued on the other queue, and the daemon resumed: the read must
/// complete while the zeroing is still in progress. No timing decides: a
/// thread that finishes the zeroing before looking at the other queue fails
/// however fast it is. With both I/O engines.
#[test]
fn huge_write_zeroes_does_not_hold_up_another_queue() -> Result<()> {
    huge_write_zeroes_with(&[]).context("io_uring engine")?;
    if target() == Target::Vubd {
        huge_write_zeroes_with(&["--aio", "sync"]).context("sync engine")?;
    }
    Ok(())
}

fn huge_write_zeroes_with(daemon_args: &[&str]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    const SIZE: u64 = 1 << 30;
    let dir = ScratchDir::new_in("/dev/shm", "hostile-zeroes")?;
    let image = dir.join("disk.img");
    tests::daemon::create_image(&image, SIZE)?;
    let socket = dir.join("vhost.sock");
    let mut daemon = match target() {
        Target::Vubd => {
            let mut args = vec!["--queues", "2", "--threads", "1"];
            args.extend_from_slice(daemon_args);
            Daemon::vubd_sealed_only(&socket, &image, &args)?
        }
        Target::Qsd => Daemon::qsd(&socket, &image, 2, false)?,
    };
    let mut fe = RawFrontend::connect(
        &socket,
        Options {
            num_queues: 2,
            ..Options::default()
        },
    )?;
    let allocated = || -> Result<u64> { Ok(std::fs::metadata(&image)?.blocks() * 512) };
    let segment = Segment::new(0, (SIZE / SECTOR_SIZE) as u32);
    let zeroes = fe.submit_request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment.bytes(), 0)?;
    // Against hangs only.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while allocated()? == 0 {
        ensure!(
            std::time::Instant::now() < deadline,
            "the WRITE_ZEROES never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    daemon.signal(libc::SIGSTOP)?;
    let frozen_at = allocated()?;
    let read = fe.submit_read(1, 0, 512);
    daemon.signal(libc::SIGCONT)?;
    let read = read?;
    ensure!(
        frozen_at < SIZE / 2,
        "inconclusive: {frozen_at} of {SIZE} bytes were zeroed before the daemon could be stopped"
    );
    let o = fe.outcome(&read, Duration::from_secs(60))?;
    ensure!(o.status() == Some(OK), "read on queue 1: {o}");
    let progress = allocated()?;
    let z = fe.outcome(&zeroes, Duration::ZERO)?;
    eprintln!(
        "[{:?}] read on queue 1 done with {progress} of {SIZE} bytes zeroed on queue 0 ({frozen_at} when queued); WRITE_ZEROES: {z}",
        target()
    );
    ensure!(
        z == Outcome::NotUsed,
        "the read on queue 1 waited for queue 0's whole WRITE_ZEROES ({frozen_at} of {SIZE} bytes were zeroed when it was queued)"
    );
    let z = fe.outcome(&zeroes, Duration::from_secs(120))?;
    ensure!(z.status() == Some(OK), "WRITE_ZEROES: {z}");
    if target() == Target::Vubd {
        // Every step ran: tmpfs holds the written zeroes.
        ensure!(
            allocated()? == SIZE,
            "after the WRITE_ZEROES only {} of {SIZE} bytes are allocated",
            allocated()?
        );
    }
    ensure!(
        fe.read(0, 4096)? == vec![0u8; 4096],
        "the zeroed range does not read back as zeroes"
    );
    if let Some(status) = daemon.try_wait()? {
        bail!("{:?} died: {status}", target());
    }
    Ok(())
}

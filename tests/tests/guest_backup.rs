//! Issue 10's backup flow, full then incremental, under a real guest: a
//! QEMU guest (TCG) runs fio random writes with crc32c verification on its
//! vhost-user-blk disk, and QEMU's NBD client (`qemu-io`) writes another
//! area of the same disk through a writable NBD export, while the daemon
//! fleeces the disk and `nbdcopy`/`nbdinfo` read the backup export. Run on
//! vubd and on qemu-storage-daemon 7.2 with the same commands and checks.
//!
//! The checkpoint instant is made knowable byte for byte the way a backup
//! tool that quiesces does it: QMP `stop` on QEMU (QEMU stops the
//! vhost-user rings; vubd answers only with nothing from them in flight,
//! qemu-storage-daemon's `transaction` drains what it still has), the NBD
//! writer paused between two writes, the `transaction`, the image read as
//! the reference, then `cont` and the writer resumed. Both write again before
//! and during the copy, so the copy-before-write filter is exercised by
//! both. Checks: the full copy equals reference 1; the full copy plus the
//! extents `qemu:dirty-bitmap:b0` marks dirty, read from the second export
//! with stock tools (docs/backup.md's recipe), equals reference 2; b0
//! covers every 4 KiB block that differs between the two references; fio
//! verifies every block it wrote, across both checkpoints; at the end the
//! disk the guest reads equals the image file.
//!
//! The second writer is not libblkio: a vhost-user socket serves one
//! frontend at a time and the guest holds it, and libblkio has no NBD
//! driver.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tests::daemon::{Daemon, ScratchDir};
use tests::guest::{wait_for_marker, Guest, GuestOutput};
use tests::nbd_tools::{apply_dirty_extents, dirty_extents, run};
use tests::qmp_client::QmpClient;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const BLOCK: u64 = 4096;
/// The guest's fio writes [0, FIO_END).
const FIO_END: u64 = 40 * MIB;
/// The NBD writer writes [WRITER_START, WRITER_END).
const WRITER_START: u64 = 40 * MIB;
const WRITER_END: u64 = 62 * MIB;
/// The block the host writes `S`s to when the guest should finish.
const MAILBOX: u64 = 63 * MIB;
/// Bounds against hangs, not speed checks.
const TIMEOUT: Duration = Duration::from_secs(60);
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// fio in rounds of 4 MiB of random 4 KiB writes, each round verified
/// after its writes, until the mailbox block reads `SSSS`. A round that
/// spans a checkpoint reads back, after it, blocks written before it.
const SCRIPT: &str = r#"
i=0; wkb=0; rkb=0
result phase writing
while :; do
  i=$((i + 1))
  $FIO --name=r$i --filename=/dev/vda --direct=1 --ioengine=io_uring \
      --rw=randwrite --bs=4k --iodepth=8 --size=40M --io_size=4M --randseed=$i \
      --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err
  rc=$?
  if [ $rc != 0 ]; then cat /tmp/fio.out /tmp/fio.err; result fio_rc $rc; fail "fio round $i exited $rc"; fi
  wkb=$((wkb + $(cut -d';' -f47 /tmp/fio.out)))
  rkb=$((rkb + $(cut -d';' -f6 /tmp/fio.out)))
  m=$(dd if=/dev/vda bs=4096 skip=16128 count=1 iflag=direct 2>/dev/null | head -c 4)
  [ "$m" = SSSS ] && break
done
result fio_rc 0
result rounds $i
result fio_write_kb $wkb
result fio_read_kb $rkb
echo 3 > /proc/sys/vm/drop_caches
result md5 "$(md5sum /dev/vda | cut -d' ' -f1)"
"#;

/// vubd or qemu-storage-daemon serving `disk0` over vhost-user, with its
/// QMP monitor and an NBD server.
struct Peer {
    _daemon: Daemon,
    qmp: QmpClient,
    vhost: PathBuf,
    nbd: PathBuf,
    image: PathBuf,
    tmp: PathBuf,
    name: &'static str,
}

impl Peer {
    fn start(dir: &ScratchDir, qsd: bool) -> Result<Peer> {
        let name = if qsd { "qsd" } else { "vubd" };
        let image = dir.join("disk.img");
        std::fs::File::create(&image)?.set_len(SIZE)?;
        let vhost = dir.join("vhost.sock");
        let qmp = dir.join("qmp.sock");
        let daemon = if qsd {
            Daemon::qsd_with_monitor(&vhost, &qmp, &image, "discard=unmap", true)?
        } else {
            let q = qmp.to_string_lossy().into_owned();
            Daemon::vubd(&vhost, &image, &["--qmp", &q])?
        };
        let mut p = Peer {
            _daemon: daemon,
            qmp: QmpClient::connect(&qmp, TIMEOUT)?,
            vhost,
            nbd: dir.join("nbd.sock"),
            tmp: dir.join("tmp.raw"),
            image,
            name,
        };
        p.qmp.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": p.nbd}}}),
        )?;
        Ok(p)
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd.display())
    }
}

/// `qemu-io` on an NBD export, driven over its standard input one command
/// at a time: a command has completed when its reply line is read.
struct QemuIo {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl QemuIo {
    fn open(uri: &str) -> Result<QemuIo> {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start qemu-io")?;
        let stdin = child.stdin.take().context("qemu-io stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("qemu-io stdout")?);
        Ok(QemuIo {
            child,
            stdin,
            stdout,
        })
    }

    /// Writes the 4 KiB block at `offset` full of `byte`.
    fn write(&mut self, offset: u64, byte: u8) -> Result<()> {
        writeln!(self.stdin, "write -P {byte} {offset} {BLOCK}")?;
        self.stdin.flush()?;
        let done = format!("wrote {BLOCK}/{BLOCK} bytes at offset {offset}");
        let mut line = String::new();
        loop {
            line.clear();
            ensure!(
                self.stdout.read_line(&mut line)? > 0,
                "qemu-io exited during a write"
            );
            if line.contains(&done) {
                return Ok(());
            }
            ensure!(!line.contains("failed"), "qemu-io: {}", line.trim());
        }
    }

    fn close(mut self) -> Result<()> {
        writeln!(self.stdin, "quit")?;
        self.stdin.flush()?;
        let status = self.child.wait()?;
        ensure!(status.success(), "qemu-io exited with {status}");
        Ok(())
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct WriterState {
    paused: bool,
    busy: bool,
    stop: bool,
    count: u64,
}

/// The second writer: 4 KiB blocks with a new byte each, at pseudo-random
/// places of [WRITER_START, WRITER_END), through `qemu-io`. It can be
/// paused between two writes.
struct NbdWriter {
    state: Arc<(Mutex<WriterState>, Condvar)>,
    /// None once stopped.
    thread: Option<JoinHandle<Result<QemuIo>>>,
}

impl NbdWriter {
    fn start(uri: &str, seed: u64) -> Result<NbdWriter> {
        let mut io = QemuIo::open(uri)?;
        let state = Arc::new((Mutex::new(WriterState::default()), Condvar::new()));
        let st = state.clone();
        let thread = std::thread::spawn(move || -> Result<QemuIo> {
            let mut x = seed | 1;
            loop {
                {
                    let mut s = lock(&st.0);
                    while s.paused && !s.stop {
                        s = st.1.wait(s).unwrap_or_else(|e| e.into_inner());
                    }
                    if s.stop {
                        return Ok(io);
                    }
                    s.busy = true;
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = WRITER_START / BLOCK + x % ((WRITER_END - WRITER_START) / BLOCK);
                let r = io.write(block * BLOCK, (x >> 56) as u8 | 0x80);
                let mut s = lock(&st.0);
                s.busy = false;
                s.count += 1;
                st.1.notify_all();
                drop(s);
                r?;
            }
        });
        Ok(NbdWriter {
            state,
            thread: Some(thread),
        })
    }

    /// Waits (bounded) until `pred` holds for the state.
    fn wait_for(&self, what: &str, pred: impl Fn(&WriterState) -> bool) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        let mut s = lock(&self.state.0);
        while !pred(&s) {
            ensure!(
                self.thread.as_ref().is_some_and(|t| !t.is_finished()),
                "the NBD writer ended"
            );
            ensure!(Instant::now() < deadline, "the NBD writer: no {what}");
            s = self
                .state
                .1
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Returns once no write is in flight and none will start.
    fn pause(&self) -> Result<()> {
        lock(&self.state.0).paused = true;
        self.wait_for("pause", |s| !s.busy)
    }

    fn resume(&self) {
        lock(&self.state.0).paused = false;
        self.state.1.notify_all();
    }

    /// The writes completed so far.
    fn count(&self) -> u64 {
        lock(&self.state.0).count
    }

    /// Waits until `n` more writes have completed.
    fn wait_writes(&self, n: u64) -> Result<()> {
        let target = self.count() + n;
        self.wait_for("progress", |s| s.count >= target)
    }

    /// Stops the writer; returns its `qemu-io`.
    fn stop(&mut self) -> Result<QemuIo> {
        lock(&self.state.0).stop = true;
        self.state.1.notify_all();
        let thread = self.thread.take().context("the NBD writer was stopped")?;
        match thread.join() {
            Ok(r) => r,
            Err(_) => bail!("the NBD writer panicked"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until the guest has written its area since `reference` was read.
fn wait_guest_writes(
    p: &Peer,
    reference: &[u8],
    guest: &JoinHandle<Result<GuestOutput>>,
) -> Result<()> {
    let area = 0..FIO_END as usize;
    let deadline = Instant::now() + TIMEOUT;
    while std::fs::read(&p.image)?[area.clone()] == reference[area.clone()] {
        ensure!(!guest.is_finished(), "the guest ended");
        ensure!(Instant::now() < deadline, "the guest did not write");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Requires the file at `path` to equal `want`.
fn same(path: &Path, want: &[u8], what: &str) -> Result<()> {
    let got = std::fs::read(path)?;
    ensure!(got.len() == want.len(), "{what}: size {}", got.len());
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        bail!("{what} differs from the image at the checkpoint at byte {i}");
    }
    Ok(())
}

/// What a backup sees: the daemon, QEMU's monitor, the NBD writer and the
/// guest's runner.
struct Scene<'a> {
    p: &'a mut Peer,
    vm: QmpClient,
    writer: NbdWriter,
    guest: Option<JoinHandle<Result<GuestOutput>>>,
}

impl Drop for Scene<'_> {
    /// A failed check leaves the guest looping: quit QEMU, which would
    /// otherwise outlive the test.
    fn drop(&mut self) {
        if self.guest.is_some() {
            let _ = self.vm.execute("quit", json!({}));
        }
    }
}

impl Scene<'_> {
    fn guest(&self) -> Result<&JoinHandle<Result<GuestOutput>>> {
        self.guest
            .as_ref()
            .context("the guest was already waited for")
    }

    /// Waits for the guest to finish (it does once the mailbox is written).
    fn wait_guest(&mut self) -> Result<GuestOutput> {
        let guest = self
            .guest
            .take()
            .context("the guest was already waited for")?;
        match guest.join() {
            Ok(out) => out,
            Err(_) => bail!("the guest's thread panicked"),
        }
    }

    /// A checkpoint: with the guest stopped and the writer paused, the
    /// `transaction` of `actions` and the image read as the reference;
    /// then the fleecing export `backup` (with `bitmaps`), written by both
    /// writers before and while `nbdcopy` copies it to `copy`, which must
    /// equal the reference. The export stays up; returns the reference.
    fn backup(&mut self, actions: Value, bitmaps: Value, copy: &Path) -> Result<Vec<u8>> {
        let q = &mut self.p.qmp;
        std::fs::File::create(&self.p.tmp)?.set_len(SIZE)?;
        q.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": "tmp0", "filename": self.p.tmp}),
        )?;
        self.vm.ok("stop", json!({}))?;
        self.writer.pause()?;
        q.ok("transaction", json!({ "actions": actions }))?;
        let reference = std::fs::read(&self.p.image)?;
        self.vm.ok("cont", json!({}))?;
        self.writer.resume();
        q.ok(
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "acc0", "file": "cbw0"}),
        )?;
        q.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "x0", "node-name": "acc0", "name": "backup",
                   "bitmaps": bitmaps}),
        )?;
        wait_guest_writes(self.p, &reference, self.guest()?)?;
        self.writer.wait_writes(20)?;
        let (before, started) = (self.writer.count(), Instant::now());
        run("nbdcopy", &[&self.p.uri("backup"), &copy.to_string_lossy()])?;
        eprintln!(
            "{}: nbdcopy took {:?}; {} NBD writes completed meanwhile",
            self.p.name,
            started.elapsed(),
            self.writer.count() - before
        );
        same(copy, &reference, "the copy of the export")?;
        Ok(reference)
    }

    /// The recipe's teardown: export, access node, job, target.
    fn teardown(&mut self) -> Result<()> {
        let q = &mut self.p.qmp;
        q.ok("block-export-del", json!({"id": "x0"}))?;
        q.wait_event("BLOCK_EXPORT_DELETED", TIMEOUT, |d| d["id"] == "x0")?;
        q.ok("blockdev-del", json!({"node-name": "acc0"}))?;
        q.ok("block-job-cancel", json!({"device": "fl0"}))?;
        q.wait_event("JOB_STATUS_CHANGE", TIMEOUT, |d| {
            d["id"] == "fl0" && d["status"] == "null"
        })?;
        q.ok("blockdev-del", json!({"node-name": "tmp0"}))?;
        Ok(())
    }
}

fn backup_action() -> Value {
    json!({"type": "blockdev-backup",
           "data": {"job-id": "fl0", "device": "disk0", "target": "tmp0",
                    "sync": "none", "filter-node-name": "cbw0"}})
}

/// The flow on one daemon, under the guest and the NBD writer.
fn flow(qsd: bool) -> Result<()> {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = ScratchDir::new_in("/dev/shm", "guest-backup")?;
    let mut p = Peer::start(&dir, qsd)?;
    // QEMU cannot store bitmaps in a raw file; vubd can.
    let persistent = !qsd;
    p.qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "w0", "node-name": "disk0", "name": "disk",
               "writable": true}),
    )?;
    let writer = NbdWriter::start(&p.uri("disk"), 7)?;
    let name = format!("guest_backup_{}", p.name);
    let vm_qmp = dir.join("vm-qmp.sock");
    let guest = Guest::new(&name, &p.vhost, SCRIPT)
        .qmp(&vm_qmp)
        .timeout(GUEST_TIMEOUT)
        .spawn()?;
    wait_for_marker(&name, "VUBD-RESULT phase=writing", GUEST_TIMEOUT, &guest)?;
    let vm = QmpClient::connect(&vm_qmp, TIMEOUT)?;
    let mut s = Scene {
        p: &mut p,
        vm,
        writer,
        guest: Some(guest),
    };
    wait_guest_writes(s.p, &vec![0; SIZE as usize], s.guest()?)?;
    s.writer.wait_writes(20)?;

    let full = dir.join("full.raw");
    let ref1 = s.backup(
        json!([{"type": "block-dirty-bitmap-add",
                "data": {"node": "disk0", "name": "b0", "persistent": persistent}},
               backup_action()]),
        json!([]),
        &full,
    )?;
    s.teardown()?;

    let ref2 = s.backup(
        json!([{"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}},
               {"type": "block-dirty-bitmap-add",
                "data": {"node": "disk0", "name": "b1", "persistent": persistent}},
               backup_action()]),
        json!([{"node": "disk0", "name": "b0"}]),
        &dir.join("second.raw"),
    )?;
    let dirty = dirty_extents(&s.p.uri("backup"), "b0")?;
    let changed: Vec<u64> = (0..SIZE / BLOCK)
        .filter(|b| {
            let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
            ref1[r.clone()] != ref2[r]
        })
        .collect();
    for area in [0..FIO_END, WRITER_START..WRITER_END] {
        ensure!(
            changed.iter().any(|b| area.contains(&(b * BLOCK))),
            "no block of {area:?} changed between the checkpoints"
        );
    }
    for b in &changed {
        let (start, end) = (b * BLOCK, (b + 1) * BLOCK);
        ensure!(
            dirty.iter().any(|&(a, z)| a <= start && end <= z),
            "block {b} changed between the checkpoints but is not dirty in b0"
        );
    }
    apply_dirty_extents(&s.p.nbd, "backup", "b0", &full)?;
    same(&full, &ref2, "the full copy plus the increment")?;
    s.teardown()?;
    let dirty_bytes: u64 = dirty.iter().map(|(a, z)| z - a).sum();
    eprintln!(
        "{}: {} blocks changed between the checkpoints; b0 marks {} KiB dirty",
        s.p.name,
        changed.len(),
        dirty_bytes / 1024
    );

    let mut io = s.writer.stop()?;
    io.write(MAILBOX, b'S')?;
    io.close()?;
    let out = s.wait_guest()?;
    out.ensure_clean()?;
    ensure!(out.get("fio_rc")? == "0", "fio failed: {}", out.tail(30));
    let (w, r) = (
        out.get_parsed::<u64>("fio_write_kb")?,
        out.get_parsed::<u64>("fio_read_kb")?,
    );
    ensure!(w > 0 && r == w, "fio wrote {w} KiB and verified {r} KiB");
    let md5 = run("md5sum", &[&s.p.image.to_string_lossy()])?;
    ensure!(
        md5.split_whitespace().next() == Some(out.get("md5")?),
        "the image is not the disk the guest read"
    );
    Ok(())
}

/// One test for both daemons, one after the other: the guests would run
/// one at a time anyway, with the other daemon's writer idling meanwhile.
#[test]
fn fleecing_under_a_guest_matches_qemu() -> Result<()> {
    flow(false).context("vubd")?;
    flow(true).context("qsd")
}

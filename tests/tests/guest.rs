//! Guest tests: a real Linux guest (Debian kernel, busybox initramfs, under
//! QEMU TCG) uses a disk served over vhost-user-blk, and the host checks what
//! the guest reports against the image file itself.
//!
//! The backend is vubd by default; `VUBD_GUEST_BACKEND=qsd` runs the same
//! tests against qemu-storage-daemon, the reference implementation, which
//! is how the tests themselves were validated (checks of vubd-only
//! behaviour, the --serial string, are skipped there).
//!
//! Each test boots one or two guests of a few seconds each; the runner
//! serializes guests, so the tests can run in parallel threads without
//! slowing each other down. Serial logs are kept in target/guest-logs/.

use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tests::daemon::{create_image, Daemon, ScratchDir};
use tests::guest::Guest;

const MIB: u64 = 1 << 20;
/// The --serial string given to vubd, checked in /sys/block/vda/serial.
const SERIAL: &str = "vubd-guest-test";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Backend {
    Vubd,
    Qsd,
}

fn backend() -> Backend {
    match std::env::var("VUBD_GUEST_BACKEND").as_deref() {
        Ok("qsd") => Backend::Qsd,
        _ => Backend::Vubd,
    }
}

/// A scratch directory with an image and a running backend serving it.
struct Setup {
    // Fields drop in order: stop the daemon before removing its directory.
    daemon: Daemon,
    image: PathBuf,
    socket: PathBuf,
    _dir: ScratchDir,
}

/// Starts the backend on `image` (created sparse with `size` bytes unless
/// `prepare` already wrote it) with `queues` queues.
fn setup(
    tag: &str,
    size: u64,
    queues: u16,
    prepare: impl FnOnce(&Path) -> Result<()>,
) -> Result<Setup> {
    setup_with(tag, size, queues, &[], prepare)
}

/// `setup`, with extra arguments for vubd.
fn setup_with(
    tag: &str,
    size: u64,
    queues: u16,
    vubd_extra: &[&str],
    prepare: impl FnOnce(&Path) -> Result<()>,
) -> Result<Setup> {
    let _ = env_logger::builder().is_test(true).try_init();
    // Images on tmpfs: no disk noise, and tmpfs punches holes for discard.
    let dir = ScratchDir::new_in("/dev/shm", tag)?;
    let image = dir.join("disk.img");
    let socket = dir.join("vhost.sock");
    create_image(&image, size)?;
    prepare(&image)?;
    let daemon = match backend() {
        Backend::Vubd => {
            let q = queues.to_string();
            let mut args = vec!["--queues", &q, "--serial", SERIAL];
            args.extend_from_slice(vubd_extra);
            // vubd's own memory policy: QEMU's memory-backend-memfd seals
            // its memory by default, so the guest must be served without
            // --allow-unsealed-memory.
            Daemon::vubd_sealed_only(&socket, &image, &args)?
        }
        Backend::Qsd => Daemon::qsd(&socket, &image, queues, false)?,
    };
    Ok(Setup {
        daemon,
        image,
        socket,
        _dir: dir,
    })
}

impl Setup {
    /// Fails if the backend has died (a crash during the guest's run should
    /// fail the test even if the guest happened to cope).
    fn ensure_daemon_alive(&mut self) -> Result<()> {
        if let Some(status) = self.daemon.try_wait()? {
            bail!("backend exited during the test: {status}");
        }
        Ok(())
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure reproduces.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of `data` as lowercase hex, computed by the host's sha256sum.
fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run sha256sum")?;
    child.stdin.take().context("stdin")?.write_all(data)?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout)?;
    let hex = text
        .split_whitespace()
        .next()
        .context("empty sha256sum output")?;
    Ok(hex.to_string())
}

fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// (1) fio random writes with crc32c verification on the raw disk, plus the
/// device's identity: capacity and serial as the guest sees them.
#[test]
fn fio_randwrite_verify() -> Result<()> {
    let size = 64 * MIB;
    let mut s = setup("fio", size, 1, |_| Ok(()))?;
    let script = r#"
result size_sectors "$(cat /sys/block/vda/size)"
result serial "$(cat /sys/block/vda/serial)"
result logical_block_size "$(cat /sys/block/vda/queue/logical_block_size)"
$FIO --name=verify --filename=/dev/vda --thread --direct=1 --ioengine=io_uring \
    --rw=randwrite --bs=4k --iodepth=16 --size=32M \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=0 \
    --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err
rc=$?
cat /tmp/fio.err
result fio_rc $rc
# terse v3: field 6 is read KiB, field 47 write KiB (1-based; ';'-separated)
result fio_read_kb "$(cut -d';' -f6 /tmp/fio.out)"
result fio_write_kb "$(cut -d';' -f47 /tmp/fio.out)"
[ $rc = 0 ] || fail "fio exited $rc"
"#;
    let out = Guest::new("fio_randwrite_verify", &s.socket, script).run()?;
    out.ensure_clean()?;
    s.ensure_daemon_alive()?;

    ensure!(
        out.get_parsed::<u64>("size_sectors")? * 512 == size,
        "guest capacity {} sectors, image is {size} bytes",
        out.get("size_sectors")?
    );
    ensure!(
        out.get_parsed::<u64>("fio_write_kb")? == 32 * 1024,
        "fio wrote {} KiB",
        out.get("fio_write_kb")?
    );
    // The verify phase re-reads everything it wrote.
    ensure!(
        out.get_parsed::<u64>("fio_read_kb")? == 32 * 1024,
        "fio verified {} KiB",
        out.get("fio_read_kb")?
    );
    if backend() == Backend::Vubd {
        ensure!(
            out.get("serial")? == SERIAL,
            "guest serial {:?}",
            out.get("serial")?
        );
    }

    // Every 4 KiB block of the first 32 MiB was written (fio's random map
    // covers each block once) and reached the image file: fio's verify
    // header makes each block non-zero; beyond 32 MiB nothing was written.
    let data = read_at(&s.image, 0, size as usize)?;
    let (written, rest) = data.split_at(32 * MIB as usize);
    let zero_blocks = written
        .chunks(4096)
        .filter(|b| b.iter().all(|&x| x == 0))
        .count();
    ensure!(
        zero_blocks == 0,
        "{zero_blocks} blocks of fio's region are still zero in the image"
    );
    ensure!(
        rest.iter().all(|&x| x == 0),
        "data beyond fio's 32 MiB region in the image"
    );
    Ok(())
}

/// (2) ext4: mkfs, copy files the host made, unmount, drop caches, remount,
/// compare hashes with the host's; fsck clean in the guest and on the host;
/// the host reads the files back out of the image with debugfs.
#[test]
fn ext4_files_survive_remount() -> Result<()> {
    let size = 64 * MIB;
    let mut s = setup("ext4", size, 1, |_| Ok(()))?;
    let files: Vec<(String, Vec<u8>)> = [(1, 4097usize), (2, 1 << 20), (3, 3 * (1 << 20) + 513)]
        .iter()
        .map(|&(seed, len)| (format!("f{seed}"), pattern(seed, len)))
        .collect();
    let script = r#"
$MKFS_EXT4 -q -F /dev/vda || fail "mkfs.ext4 exited $?"
mount -t ext4 /dev/vda /mnt || fail "mount failed"
for f in /data/*; do cp $f /mnt/ || fail "cp $f"; done
umount /mnt || fail "umount failed"
echo 3 > /proc/sys/vm/drop_caches
$E2FSCK -fn /dev/vda >/tmp/fsck.out 2>&1
rc=$?
cat /tmp/fsck.out
result fsck_rc $rc
mount -t ext4 /dev/vda /mnt || fail "remount failed"
for f in /mnt/f*; do result "sha_$(basename $f)" "$(sha256sum $f | cut -d' ' -f1)"; done
umount /mnt || fail "second umount failed"
"#;
    let mut guest = Guest::new("ext4_files_survive_remount", &s.socket, script);
    for (name, data) in &files {
        guest = guest.file(&format!("data/{name}"), data.clone());
    }
    let out = guest.run()?;
    out.ensure_clean()?;
    s.ensure_daemon_alive()?;
    ensure!(
        out.get("fsck_rc")? == "0",
        "guest e2fsck exited {}",
        out.get("fsck_rc")?
    );
    for (name, data) in &files {
        let want = sha256_hex(data)?;
        let got = out.get(&format!("sha_{name}"))?;
        ensure!(got == want, "{name}: guest read sha256 {got}, wrote {want}");
    }

    // The image on the host: a clean file system holding the same bytes.
    let fsck = Command::new("e2fsck").arg("-fn").arg(&s.image).output()?;
    ensure!(
        fsck.status.success(),
        "host e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    for (name, data) in &files {
        let dump = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{name}"))
            .arg(&s.image)
            .output()?;
        ensure!(dump.status.success(), "debugfs cat /{name} failed");
        ensure!(
            &dump.stdout == data,
            "{name}: image holds different bytes ({} read)",
            dump.stdout.len()
        );
    }
    Ok(())
}

/// (3) Two queues: the guest gets two blk-mq hardware queues, and I/O pinned
/// to each CPU completes through each of them (per-queue interrupt counts).
#[test]
fn two_queues_both_used() -> Result<()> {
    two_queues("mq", &[])
}

/// The same with both queues served by one vubd thread (one shared ring).
#[test]
fn two_queues_on_one_thread() -> Result<()> {
    if backend() != Backend::Vubd {
        return Ok(());
    }
    two_queues("mq-thread", &["--threads", "1"])
}

fn two_queues(tag: &str, vubd_extra: &[&str]) -> Result<()> {
    let mut s = setup_with(tag, 64 * MIB, 2, vubd_extra, |_| Ok(()))?;
    let script = r#"
result mq_count "$(ls /sys/block/vda/mq | wc -l)"
$FIO --name=q --filename=/dev/vda --thread --direct=1 --ioengine=psync --rw=randread \
    --bs=4k --size=16M --io_size=2M --numjobs=2 --cpus_allowed=0,1 --cpus_allowed_policy=split \
    >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; fail "fio exited $?"; }
# Completions per queue: each virtqueue has its own MSI-X vector, named
# virtioN-req.Q; sum its per-CPU counts.
for q in 0 1; do
    result "irqs_q$q" "$(awk -v q="-req.$q" 'index($0, q) { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s + 0 }' /proc/interrupts)"
done
cat /proc/interrupts
"#;
    let out = Guest::new(tag, &s.socket, script).num_queues(2).run()?;
    out.ensure_clean()?;
    s.ensure_daemon_alive()?;
    ensure!(
        out.get("mq_count")? == "2",
        "guest has {} mq queues",
        out.get("mq_count")?
    );
    for q in 0..2 {
        let n: u64 = out.get_parsed(&format!("irqs_q{q}"))?;
        // 2 MiB of 4 KiB synchronous reads per job and CPU: 512 requests on
        // each queue, nearly each completion its own interrupt at QD1.
        ensure!(n >= 256, "queue {q} raised only {n} interrupts");
    }
    Ok(())
}

/// Allocated bytes of a file (st_blocks is in 512-byte units).
fn allocated(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// (4) Discard frees space in the image file; write-zeroes reads back as
/// zeros; data outside both ranges is untouched. The disk is 1 GiB (sparse
/// but for its first 64 MiB) so that one discard segment can be as large as
/// the device allows (Linux sends up to discard_max_bytes in one segment).
#[test]
fn discard_shrinks_image() -> Result<()> {
    let size = 1024 * MIB;
    let filled = 64 * MIB;
    let fill = pattern(7, filled as usize);
    let mut s = setup("discard", size, 1, |img| {
        let mut f = std::fs::OpenOptions::new().write(true).open(img)?;
        f.write_all(&fill)?;
        Ok(())
    })?;
    let before = allocated(&s.image)?;
    ensure!(
        before >= filled,
        "image not allocated before the test ({before})"
    );
    let script = r#"
result discard_max_bytes "$(cat /sys/block/vda/queue/discard_max_bytes)"
result write_zeroes_max_bytes "$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
# Discard 16-48 MiB; write zeroes over 8-16 MiB; discard 64 MiB-1 GiB (never
# written: no space to free, but the largest segments). All run whatever
# happens, so a failure report shows every symptom at once.
$BLKDISCARD -o $((16 << 20)) -l $((32 << 20)) /dev/vda
result discard_rc $?
$BLKDISCARD -z -o $((8 << 20)) -l $((8 << 20)) /dev/vda
result zeroout_rc $?
$BLKDISCARD -o $((64 << 20)) /dev/vda
result big_discard_rc $?
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=1M skip=8 count=8 2>/dev/null | cmp -s -n $((8 << 20)) - /dev/zero
result zeroes_cmp $?
"#;
    let out = Guest::new("discard_shrinks_image", &s.socket, script).run()?;
    s.ensure_daemon_alive()?;
    ensure!(
        out.get("discard_rc")? == "0",
        "blkdiscard failed: {}",
        out.kernel_errors().join("; ")
    );
    ensure!(
        out.get("zeroout_rc")? == "0",
        "blkdiscard -z failed: {}",
        out.kernel_errors().join("; ")
    );
    ensure!(
        out.get("big_discard_rc")? == "0",
        "blkdiscard of 960 MiB (discard_max_bytes {}) failed: {}",
        out.get("discard_max_bytes")?,
        out.kernel_errors().join("; ")
    );
    out.ensure_clean()?;
    ensure!(
        out.get_parsed::<u64>("discard_max_bytes")? > 0,
        "guest sees no discard support"
    );
    ensure!(
        out.get("zeroes_cmp")? == "0",
        "write-zeroes range does not read back as zeros"
    );

    let after = allocated(&s.image)?;
    ensure!(
        before.saturating_sub(after) >= 31 * MIB,
        "image allocation went from {before} to {after} bytes after discarding 32 MiB"
    );
    let data = read_at(&s.image, 0, filled as usize)?;
    let m = MIB as usize;
    ensure!(
        data[8 * m..16 * m].iter().all(|&b| b == 0),
        "write-zeroes range not zero in the image"
    );
    for (lo, hi) in [(0, 8 * m), (48 * m, 64 * m)] {
        ensure!(
            data[lo..hi] == fill[lo..hi],
            "bytes {lo}..{hi} changed though not discarded"
        );
    }
    Ok(())
}

/// Script writing a host-made file at 4 MiB and a marker in the first
/// sector, or (when the marker is there) hashing the file region back.
const WRITE_OR_VERIFY: &str = r#"
marker=$(dd if=/dev/vda bs=16 count=1 2>/dev/null)
if [ "$marker" != "VUBD-WRITTEN-OK!" ]; then
    result phase write
    dd if=/data/blob of=/dev/vda bs=1M seek=4 conv=fsync 2>/dev/null || fail "dd write"
    printf 'VUBD-WRITTEN-OK!' | dd of=/dev/vda bs=16 count=1 conv=fsync,notrunc 2>/dev/null || fail "dd marker"
    sync
    if [ -n "$REBOOT" ]; then reboot -f; fi
else
    result phase verify
    result sha "$(dd if=/dev/vda bs=1M skip=4 count=$BLOB_MIB 2>/dev/null | sha256sum | cut -d' ' -f1)"
fi
"#;

/// (5a) A second VM attaches after the first exits, without restarting the
/// backend, and reads back what the first one wrote.
#[test]
fn second_vm_reads_first_vms_data() -> Result<()> {
    let mut s = setup("twovms", 64 * MIB, 1, |_| Ok(()))?;
    let blob = pattern(11, 8 * MIB as usize);
    let script = format!("BLOB_MIB=8\n{WRITE_OR_VERIFY}");
    let pid = s.daemon.pid();

    let first = Guest::new("second_vm_1", &s.socket, &script)
        .file("data/blob", blob.clone())
        .run()?;
    first.ensure_clean()?;
    ensure!(
        first.get("phase")? == "write",
        "first VM found a marker on a fresh disk"
    );
    s.ensure_daemon_alive()?;
    ensure!(
        read_at(&s.image, 4 * MIB, blob.len())? == blob,
        "first VM's data not in the image"
    );

    let second = Guest::new("second_vm_2", &s.socket, &script).run()?;
    second.ensure_clean()?;
    s.ensure_daemon_alive()?;
    ensure!(s.daemon.pid() == pid, "backend was restarted");
    ensure!(
        second.get("phase")? == "verify",
        "second VM did not see the first VM's marker"
    );
    ensure!(
        second.get("sha")? == sha256_hex(&blob)?,
        "second VM read different data"
    );
    Ok(())
}

/// (5b) The guest reboots (a device reset with the same frontend) and the
/// disk still works: the second boot reads what the first wrote.
#[test]
fn guest_reboot_keeps_disk_working() -> Result<()> {
    let mut s = setup("reboot", 64 * MIB, 1, |_| Ok(()))?;
    let blob = pattern(13, 4 * MIB as usize);
    let script = format!("BLOB_MIB=4\nREBOOT=1\n{WRITE_OR_VERIFY}");
    let out = Guest::new("guest_reboot", &s.socket, &script)
        .file("data/blob", blob.clone())
        .allow_reboot(true)
        .timeout(Duration::from_secs(240))
        .run()?;
    out.ensure_clean()?;
    s.ensure_daemon_alive()?;
    ensure!(
        out.log.matches("VUBD-RESULT phase=write").count() == 1,
        "the first boot did not write exactly once"
    );
    ensure!(
        out.get("phase")? == "verify",
        "no second boot reading the data back"
    );
    ensure!(
        out.get("sha")? == sha256_hex(&blob)?,
        "after reboot the guest read different data"
    );
    Ok(())
}

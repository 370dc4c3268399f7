//! Frontend tests: vubd driven by a real vhost-user-blk frontend (libblkio,
//! through `tests::client`), checked against the image file on the host.
//!
//! Every test starts its own vubd on its own image under /tmp (ext4, so hole
//! punching and SEEK_HOLE behave as on a real host). With
//! `VUBD_TEST_BACKEND=qsd` the tests that do not depend on vubd-only options
//! run against qemu-storage-daemon instead: the reference backend passing the
//! same checks shows that the checks themselves are sound. With
//! `VUBD_TEST_AIO=sync|io_uring|auto` vubd runs with that `--aio` engine,
//! and with `VUBD_TEST_DIRECT=1` with `--direct` (run the suite once per
//! engine and once with O_DIRECT).

use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::client::{Client, ClientError, ConnectOptions, Done};
use tests::daemon::{create_image, Daemon, ScratchDir};
use tests::rng::Rng;

const MIB: u64 = 1 << 20;

/// Deadline for every request: generous for a loaded 2-core machine, short
/// enough that a hung daemon fails the test instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(15);

/// Which daemon serves the tests.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Vubd,
    Qsd,
}

fn backend() -> Backend {
    match std::env::var("VUBD_TEST_BACKEND").as_deref() {
        Ok("qsd") => Backend::Qsd,
        _ => Backend::Vubd,
    }
}

/// A daemon serving a fresh image, with its scratch directory.
struct Setup {
    daemon: Daemon,
    image: PathBuf,
    socket: PathBuf,
    // Last: removed after the daemon is killed.
    _dir: ScratchDir,
}

/// Options of a test daemon that both backends understand.
#[derive(Clone, Copy)]
struct Opts {
    queues: u16,
    readonly: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            queues: 1,
            readonly: false,
        }
    }
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// Starts the daemon on a new sparse image of `size` bytes.
fn setup(tag: &str, size: u64, opts: Opts) -> Result<Setup> {
    setup_with(tag, size, opts, &[])
}

/// `setup`, with extra arguments for vubd.
fn setup_with(tag: &str, size: u64, opts: Opts, vubd_extra: &[&str]) -> Result<Setup> {
    init_log();
    let dir = ScratchDir::new(tag)?;
    let image = dir.join("disk.img");
    create_image(&image, size)?;
    let socket = dir.join("vhost.sock");
    let daemon = start_daemon(&socket, &image, opts, vubd_extra)?;
    Ok(Setup {
        daemon,
        image,
        socket,
        _dir: dir,
    })
}

fn start_daemon(socket: &Path, image: &Path, opts: Opts, vubd_extra: &[&str]) -> Result<Daemon> {
    match backend() {
        Backend::Vubd => {
            let queues = opts.queues.to_string();
            let mut args = vec!["--queues", queues.as_str()];
            if opts.readonly {
                args.push("--readonly");
            }
            let aio = std::env::var("VUBD_TEST_AIO").ok();
            if let Some(aio) = aio.as_deref() {
                args.extend_from_slice(&["--aio", aio]);
            }
            if std::env::var_os("VUBD_TEST_DIRECT").is_some_and(|v| v == "1") {
                args.push("--direct");
            }
            args.extend_from_slice(vubd_extra);
            Daemon::vubd(socket, image, &args)
        }
        Backend::Qsd => {
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=f0,filename={},discard=unmap,read-only={}",
                image.display(),
                if opts.readonly { "on" } else { "off" }
            ));
            cmd.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable={},num-queues={}",
                socket.display(),
                if opts.readonly { "off" } else { "on" },
                opts.queues
            ));
            Daemon::spawn(cmd, socket, "qemu-storage-daemon")
        }
    }
}

fn connect(socket: &Path, num_queues: usize, read_only: bool) -> Result<Client> {
    Client::connect_with(
        socket,
        &ConnectOptions {
            num_queues,
            read_only,
            timeout: TIMEOUT,
            ..ConnectOptions::default()
        },
    )
    .with_context(|| format!("connect to {}", socket.display()))
}

/// FNV-1a, to name a mismatching region in failure messages compactly.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fails with the first differing offset if `got` differs from `want`.
fn compare(what: &str, base: u64, got: &[u8], want: &[u8]) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: length {} != {}",
        got.len(),
        want.len()
    );
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        bail!(
            "{what}: data differs at disk offset {} (checksum got {:#x}, want {:#x})",
            base + first as u64,
            checksum(got),
            checksum(want)
        );
    }
    Ok(())
}

/// Reads the whole image file from the host.
fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// Where the next data (`SEEK_DATA`) starts at or after `offset`, or None.
fn seek(file: &File, offset: u64, whence: i32) -> Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e).context("lseek");
    }
    Ok(Some(r as u64))
}

/// True if no byte of `range` is allocated in the file (all hole).
fn is_hole(path: &Path, start: u64, end: u64) -> Result<bool> {
    let f = File::open(path)?;
    Ok(match seek(&f, start, libc::SEEK_DATA)? {
        None => true,
        Some(data) => data >= end,
    })
}

fn allocated_bytes(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Writes random data over the whole image from the host, so every block is
/// allocated, and returns it.
fn fill_file(path: &Path, seed: u64) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)?.len() as usize;
    let mut data = vec![0u8; len];
    Rng(seed).fill(&mut data);
    std::fs::write(path, &data)?;
    Ok(data)
}

/// Reads `len` bytes at `offset` in 1 MiB requests (for tests that are not
/// about request sizes).
fn read_chunked(c: &mut Client, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len as usize);
    let mut off = offset;
    while off < offset + len {
        let n = MIB.min(offset + len - off);
        out.extend_from_slice(&c.read(off, n as usize)?);
        off += n;
    }
    Ok(out)
}

/// Skips a vubd-only test when running against qsd.
fn vubd_only() -> bool {
    if backend() != Backend::Vubd {
        eprintln!("SKIPPED: vubd-only test");
        return false;
    }
    true
}

// ---------------------------------------------------------------------------

/// Writes the whole 64 MiB disk with random data in requests of many sizes
/// (one sector, odd sector counts at offsets that are not page aligned, 64k,
/// and requests at max-transfer), then overwrites random ranges; reads it all
/// back through the client in a different chunking and from the host file.
#[test]
fn whole_disk_write_read_back() -> Result<()> {
    let size = 64 * MIB;
    let s = setup("whole", size, Opts::default())?;
    let mut c = connect(&s.socket, 1, false)?;
    let info = c.info().clone();
    ensure!(
        info.capacity == size,
        "capacity {} != image size {size}",
        info.capacity
    );
    ensure!(
        info.request_alignment == 512,
        "request-alignment {}",
        info.request_alignment
    );
    // Largest request we send: max-transfer when the device states one.
    let max = match info.max_transfer {
        0 => 4 * MIB,
        m => m.min(16 * MIB),
    } as usize;
    eprintln!("device: {info:?}; largest request {max}");

    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(1);
    rng.fill(&mut model);

    // Sequential pass: cycle through sizes so that offsets drift off page
    // alignment (512, 3*512...) and back; large ones hit max-transfer.
    let sizes = [
        512,
        4096,
        3 * 512,
        65536,
        7 * 512,
        max,
        max - 512,
        128 * 1024 + 512,
        1 << 20,
    ];
    let mut off = 0usize;
    let mut i = 0;
    while off < model.len() {
        let len = sizes[i % sizes.len()].min(model.len() - off);
        i += 1;
        c.write(off as u64, &model[off..off + len])
            .with_context(|| {
                format!(
                    "write {len}@{off} (device max-transfer {})",
                    info.max_transfer
                )
            })?;
        off += len;
    }
    // Random pass: overwrite random sector-aligned ranges.
    for _ in 0..400 {
        let len = match rng.below(4) {
            0 => (1 + rng.below(8)) as usize * 512,
            1 => (1 + rng.below(512)) as usize * 512,
            2 => max - 512 * rng.below(4) as usize,
            _ => 4096 * (1 + rng.below(64)) as usize,
        };
        let off = rng.below((model.len() - len) as u64 / 512) as usize * 512;
        rng.fill(&mut model[off..off + len]);
        c.write(off as u64, &model[off..off + len])
            .with_context(|| format!("write {len}@{off}"))?;
    }
    c.flush()?;

    // Read back through the device, chunked differently from the writes.
    let read_sizes = [max, 4096, 5 * 512, 1 << 20, 65536 + 512];
    let mut off = 0usize;
    let mut i = 0;
    while off < model.len() {
        let len = read_sizes[i % read_sizes.len()].min(model.len() - off);
        i += 1;
        let got = c.read(off as u64, len)?;
        compare("device read", off as u64, &got, &model[off..off + len])?;
        off += len;
    }
    // And from the host: the bytes landed at the right offsets of the file.
    let file = read_file(&s.image)?;
    compare("image file", 0, &file, &model)?;
    Ok(())
}

/// Four queues, four client threads, each writing its own interleaved
/// stripes at queue depth 16 (asynchronous), then everything is verified.
#[test]
fn multi_queue_concurrent_writers() -> Result<()> {
    multi_queue_writers("mq", &[])
}

/// The same with four queues on three vubd threads: one thread serves two
/// busy queues from one ring, the others one each.
#[test]
fn multi_queue_writers_on_shared_threads() -> Result<()> {
    if !vubd_only() {
        return Ok(());
    }
    multi_queue_writers("mq-threads", &["--threads", "3"])
}

fn multi_queue_writers(tag: &str, vubd_extra: &[&str]) -> Result<()> {
    let size = 64 * MIB;
    let queues = 4usize;
    let s = setup_with(
        tag,
        size,
        Opts {
            queues: queues as u16,
            ..Opts::default()
        },
        vubd_extra,
    )?;
    let mut c = connect(&s.socket, queues, false)?;
    ensure!(
        c.info().max_queues >= queues,
        "device offers {} queues",
        c.info().max_queues
    );
    let stripe = 64 * 1024u64;
    let stripes = size / stripe;
    let mut handles = Vec::new();
    for (t, mut q) in c.take_queues().into_iter().enumerate() {
        handles.push(std::thread::spawn(move || -> Result<Vec<(u64, u64)>> {
            const QD: usize = 16;
            let mut buf = q.alloc_buffer(QD * stripe as usize)?;
            let mut rng = Rng(100 + t as u64);
            // Stripes t, t+4, t+8...: disjoint from the other threads.
            let mine: Vec<u64> = (t as u64..stripes).step_by(queues).collect();
            let mut written = Vec::new();
            let mut next = 0usize;
            let mut done: Vec<Done> = Vec::new();
            let mut free: Vec<usize> = (0..QD).collect();
            while next < mine.len() || q.in_flight() > 0 {
                while next < mine.len() {
                    let Some(slot) = free.pop() else { break };
                    let range = slot * stripe as usize..(slot + 1) * stripe as usize;
                    let seed = rng.next_u64();
                    Rng(seed).fill(&mut buf.as_mut_slice()[range.clone()]);
                    q.submit_write(mine[next] * stripe, &buf, range, slot as u64)?;
                    written.push((mine[next], seed));
                    next += 1;
                }
                done.clear();
                q.wait(1, &mut done)?;
                for d in &done {
                    d.result(|| format!("queue {t} write"))?;
                    free.push(d.user_data as usize);
                }
            }
            Ok(written)
        }));
    }
    let mut expected = vec![0u8; size as usize];
    for h in handles {
        let written = h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        for (idx, seed) in written {
            let off = (idx * stripe) as usize;
            Rng(seed).fill(&mut expected[off..off + stripe as usize]);
        }
    }
    // A fresh client (the queues above were moved out and dropped).
    drop(c);
    let mut c = connect(&s.socket, 1, false)?;
    for off in (0..size).step_by(MIB as usize) {
        let got = c.read(off, MIB as usize)?;
        compare(
            "mq read-back",
            off,
            &got,
            &expected[off as usize..(off + MIB) as usize],
        )?;
    }
    compare("mq image file", 0, &read_file(&s.image)?, &expected)?;
    Ok(())
}

/// Flush completes successfully (the device offers FLUSH and a write-back
/// cache), also with writes in flight and as FUA; the data is in the file.
#[test]
fn flush_and_fua() -> Result<()> {
    let s = setup("flush", 16 * MIB, Opts::default())?;
    let mut c = connect(&s.socket, 1, false)?;
    // vubd writes through the host page cache: it must say so (CONFIG_WCE
    // writeback = 1), or a guest would skip flushes and lose data.
    // (qemu-storage-daemon reports writethrough, hence vubd only.)
    if backend() == Backend::Vubd {
        ensure!(
            c.info().flush_needed,
            "device reports no volatile write cache"
        );
    }
    let mut data = vec![0u8; 1 << 20];
    Rng(7).fill(&mut data);
    c.write(0, &data)?;
    c.flush()?;
    c.queue(0)?.write_fua(MIB, &data)?;
    // Flush submitted together with writes, all at once.
    let q = c.queue(0)?;
    let buf = q.alloc_buffer(1 << 20)?;
    for i in 0..8u64 {
        q.submit_write(2 * MIB + i * 65536, &buf, 0..65536, i)?;
    }
    q.submit_flush(99)?;
    let mut done = Vec::new();
    while q.in_flight() > 0 {
        q.wait(1, &mut done)?;
    }
    for d in &done {
        d.result(|| format!("request {}", d.user_data))?;
    }
    ensure!(done.len() == 9, "{} completions for 9 requests", done.len());
    let file = read_file(&s.image)?;
    compare("after flush", 0, &file[..1 << 20], &data)?;
    compare(
        "after fua",
        MIB,
        &file[MIB as usize..2 * MIB as usize],
        &data,
    )?;
    Ok(())
}

/// Discard punches holes in the image: the range reads back as zeroes and
/// the file has a hole there (SEEK_DATA, st_blocks); the rest is untouched.
#[test]
fn discard_punches_holes() -> Result<()> {
    let size = 16 * MIB;
    let s = setup("discard", size, Opts::default())?;
    let data = fill_file(&s.image, 3)?;
    let mut c = connect(&s.socket, 1, false)?;
    ensure!(c.info().max_discard_len > 0, "device offers no discard");
    let before = allocated_bytes(&s.image)?;
    let (start, len) = (4 * MIB, 2 * MIB);
    c.discard(start, len)?;
    ensure!(
        is_hole(&s.image, start, start + len)?,
        "no hole in the image at {start}..{} after discard",
        start + len
    );
    let after = allocated_bytes(&s.image)?;
    ensure!(
        after + len <= before,
        "st_blocks: {before} bytes allocated before, {after} after discarding {len}"
    );
    let got = c.read(start, len as usize)?;
    ensure!(
        got.iter().all(|&b| b == 0),
        "discarded range does not read as zeroes"
    );
    // Neighbours keep their data.
    let file = read_file(&s.image)?;
    compare(
        "before discard",
        0,
        &file[..start as usize],
        &data[..start as usize],
    )?;
    let end = (start + len) as usize;
    compare("after discard", end as u64, &file[end..], &data[end..])?;
    // A discard that is not page aligned but sector aligned also succeeds.
    c.discard(9 * MIB + 512, 7 * 512)?;
    Ok(())
}

/// Write zeroes reads back zeroes; with UNMAP the file gets a hole, without
/// it the range stays allocated.
#[test]
fn write_zeroes_with_and_without_unmap() -> Result<()> {
    let size = 16 * MIB;
    let s = setup("wzeroes", size, Opts::default())?;
    let data = fill_file(&s.image, 5)?;
    let mut c = connect(&s.socket, 1, false)?;
    ensure!(
        c.info().max_write_zeroes_len > 0,
        "device offers no write zeroes"
    );

    let (a, len) = (2 * MIB, MIB);
    let before = allocated_bytes(&s.image)?;
    c.write_zeroes(a, len, false)?;
    let got = c.read(a, len as usize)?;
    ensure!(
        got.iter().all(|&b| b == 0),
        "write zeroes (no unmap) does not read back zeroes"
    );
    // Blocks, not SEEK_DATA: zeroed blocks may stay allocated as unwritten
    // extents, which SEEK_DATA reports as a hole when no page is cached
    // (always so with --direct).
    let after = allocated_bytes(&s.image)?;
    ensure!(
        after >= before,
        "write zeroes without UNMAP deallocated blocks in {a}..{} ({before} bytes allocated before, {after} after)",
        a + len
    );

    let b = 8 * MIB;
    c.write_zeroes(b, len, true)?;
    let got = c.read(b, len as usize)?;
    ensure!(
        got.iter().all(|&b| b == 0),
        "write zeroes (unmap) does not read back zeroes"
    );
    ensure!(
        is_hole(&s.image, b, b + len)?,
        "write zeroes with UNMAP left data allocated in {b}..{}",
        b + len
    );

    // Small, sector-aligned but not page-aligned zeroing, both flavours.
    c.write_zeroes(12 * MIB + 512, 3 * 512, true)?;
    c.write_zeroes(13 * MIB + 1536, 5 * 512, false)?;
    let mut want = data.clone();
    for (off, l) in [
        (a, len),
        (b, len),
        (12 * MIB + 512, 1536),
        (13 * MIB + 1536, 2560),
    ] {
        want[off as usize..(off + l) as usize].fill(0);
    }
    compare("image after write zeroes", 0, &read_file(&s.image)?, &want)?;
    Ok(())
}

/// A read-only daemon: a read-write connection is refused (the device has
/// VIRTIO_BLK_F_RO), a read-only one reads the data, and writes, discards and
/// write zeroes fail with an error and leave the file untouched. (libblkio
/// refuses those on a read-only connection itself, with EBADF; that vubd
/// also refuses writes sent anyway needs a frontend that ignores RO.)
#[test]
fn read_only_device() -> Result<()> {
    let size = 8 * MIB;
    let s = setup(
        "ro",
        size,
        Opts {
            readonly: true,
            ..Opts::default()
        },
    )?;
    let data = fill_file(&s.image, 9)?;
    match connect(&s.socket, 1, false) {
        Ok(_) => bail!("a read-write connection to a read-only device succeeded"),
        Err(e) => eprintln!("read-write connection refused as expected: {e:#}"),
    }
    let mut c = connect(&s.socket, 1, true)?;
    let got = read_chunked(&mut c, 0, size)?;
    compare("read-only read", 0, &got, &data)?;
    let w = c.write(0, &[0xaa; 4096]);
    ensure!(
        matches!(w, Err(ClientError::Request { .. })),
        "write on read-only device: {w:?}"
    );
    let d = c.discard(0, MIB);
    ensure!(
        matches!(d, Err(ClientError::Request { .. })),
        "discard: {d:?}"
    );
    let z = c.write_zeroes(0, MIB, true);
    ensure!(
        matches!(z, Err(ClientError::Request { .. })),
        "write zeroes: {z:?}"
    );
    c.flush()?;
    compare("read-only image", 0, &read_file(&s.image)?, &data)?;
    Ok(())
}

/// Requests past the end of the disk fail with an error (not a hang, not a
/// short success), do not grow the file, and the queue keeps working.
#[test]
fn requests_past_end_fail_cleanly() -> Result<()> {
    let size = 8 * MIB;
    let s = setup("pastend", size, Opts::default())?;
    let mut c = connect(&s.socket, 1, false)?;
    let cap = c.capacity();
    ensure!(cap == size, "capacity {cap}");
    type Case = Box<dyn Fn(&mut Client) -> tests::client::Result<()>>;
    let cases: Vec<(&str, Case)> = vec![
        (
            "read at end",
            Box::new(move |c| c.read(cap, 4096).map(drop)),
        ),
        (
            "read across end",
            Box::new(move |c| c.read(cap - 4096, 8192).map(drop)),
        ),
        (
            "read far away",
            Box::new(move |c| c.read(cap * 1000, 512).map(drop)),
        ),
        (
            "read at 2^63-ish",
            Box::new(|c| c.read((u64::MAX >> 1) & !511, 512).map(drop)),
        ),
        (
            "write at end",
            Box::new(move |c| c.write(cap, &[1u8; 4096])),
        ),
        (
            "write across end",
            Box::new(move |c| c.write(cap - 512, &[1u8; 1024])),
        ),
        (
            "discard across end",
            Box::new(move |c| c.discard(cap - MIB, 2 * MIB)),
        ),
        (
            "write zeroes across end",
            Box::new(move |c| c.write_zeroes(cap - 4096, 8192, false)),
        ),
        (
            "write zeroes at end",
            Box::new(move |c| c.write_zeroes(cap, 4096, true)),
        ),
    ];
    for (what, f) in &cases {
        match f(&mut c) {
            Ok(()) => bail!("{what}: succeeded"),
            Err(e @ ClientError::Request { .. }) => eprintln!("{what}: {e}"),
            Err(e) => bail!("{what}: failed the wrong way: {e}"),
        }
    }
    ensure!(
        std::fs::metadata(&s.image)?.len() == size,
        "the image grew to {}",
        std::fs::metadata(&s.image)?.len()
    );
    // The last sector is still fine, and the queue still works.
    c.write(cap - 512, &[7u8; 512])?;
    ensure!(
        c.read(cap - 512, 512)? == vec![7u8; 512],
        "last sector read-back"
    );
    Ok(())
}

/// Clients come and go: each new one (with a different number of queues)
/// sees what the previous ones wrote.
#[test]
fn reconnect_sees_previous_data() -> Result<()> {
    let size = 8 * MIB;
    let s = setup(
        "reconnect",
        size,
        Opts {
            queues: 2,
            ..Opts::default()
        },
    )?;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(11);
    for round in 0..6usize {
        let mut c = connect(&s.socket, 1 + round % 2, false)
            .with_context(|| format!("connection #{round}"))?;
        let got = read_chunked(&mut c, 0, size)?;
        compare(&format!("connection #{round} read"), 0, &got, &model)?;
        let off = rng.below(size / 4096 - 64) as usize * 4096;
        rng.fill(&mut model[off..off + 256 * 1024]);
        c.write(off as u64, &model[off..off + 256 * 1024])?;
        // Closed without a flush: the next client must still see it.
    }
    compare("image", 0, &read_file(&s.image)?, &model)?;
    Ok(())
}

/// Submits a burst of writes and drops the connection without waiting:
/// the daemon must survive and serve the next client.
#[test]
fn client_dropped_with_requests_in_flight() -> Result<()> {
    let mut s = setup("dropinflight", 16 * MIB, Opts::default())?;
    for round in 0..3 {
        let mut c = connect(&s.socket, 1, false)?;
        let q = c.queue(0)?;
        let buf = q.alloc_buffer(64 * 65536)?;
        for i in 0..64u64 {
            q.submit_write(
                i * 65536,
                &buf,
                (i as usize) * 65536..(i as usize + 1) * 65536,
                i,
            )?;
        }
        drop(c);
        if let Some(status) = s.daemon.try_wait()? {
            bail!("daemon exited ({status}) after client #{round} vanished");
        }
    }
    check_fresh_client_works(&s)
}

/// A client process killed with SIGKILL in the middle of a QD32 load must
/// not hurt the next client.
#[test]
fn client_killed_mid_io() -> Result<()> {
    let mut s = setup("killclient", 32 * MIB, Opts::default())?;
    for round in 0..2 {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args([
                "helper_vanishing_client",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("VUBD_HELPER_SOCKET", &s.socket)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("start helper client")?;
        // Wait until the helper reports that its load is running.
        let out = child.stdout.take().context("helper stdout")?;
        let started = wait_for_marker(out, "HELPER-RUNNING", Duration::from_secs(30));
        // SAFETY: kill(2) on the child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = child.wait();
        started.with_context(|| format!("helper #{round} did not start its load"))?;
        if let Some(status) = s.daemon.try_wait()? {
            bail!("daemon exited ({status}) after client #{round} was killed");
        }
    }
    check_fresh_client_works(&s)
}

/// Not a test by itself: the client process that `client_killed_mid_io`
/// starts and kills. Runs a QD32 write load until killed.
#[test]
#[ignore]
fn helper_vanishing_client() -> Result<()> {
    let Ok(socket) = std::env::var("VUBD_HELPER_SOCKET") else {
        return Ok(());
    };
    let mut c = connect(Path::new(&socket), 1, false)?;
    let cap = c.capacity();
    let q = c.queue(0)?;
    let mut buf = q.alloc_buffer(32 * 65536)?;
    Rng(42).fill(buf.as_mut_slice());
    let mut rng = Rng(43);
    let mut done = Vec::new();
    let mut announced = false;
    loop {
        while q.in_flight() < 32 {
            let slot = rng.below(32) as usize;
            let off = rng.below(cap / 65536) * 65536;
            q.submit_write(off, &buf, slot * 65536..(slot + 1) * 65536, 0)?;
        }
        done.clear();
        q.wait(1, &mut done)?;
        if !announced {
            println!("HELPER-RUNNING");
            announced = true;
        }
    }
}

fn wait_for_marker(out: ChildStdout, marker: &str, timeout: Duration) -> Result<()> {
    // The pipe read blocks; do it on a thread so the deadline holds.
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            match line {
                Ok(l) if l.contains(&marker) => {
                    let _ = tx.send(true);
                    return;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(false);
    });
    match rx.recv_timeout(timeout) {
        Ok(true) => Ok(()),
        Ok(false) => bail!("output ended before the marker"),
        Err(_) => bail!("no marker within {timeout:?}"),
    }
}

/// A new client connects, writes, reads back and flushes.
fn check_fresh_client_works(s: &Setup) -> Result<()> {
    let mut c = connect(&s.socket, 1, false).context("connecting after the bad client")?;
    let mut data = vec![0u8; 256 * 1024];
    Rng(77).fill(&mut data);
    c.write(MIB, &data)?;
    c.flush()?;
    compare("after bad client", MIB, &c.read(MIB, data.len())?, &data)?;
    Ok(())
}

/// SIGTERM while a QD32 write load runs: vubd finishes what it took, flushes
/// and exits 0; every write the client saw complete is in the file.
#[test]
fn sigterm_with_io_in_flight() -> Result<()> {
    if !vubd_only() {
        return Ok(());
    }
    const BLOCK: u64 = 65536;
    const QD: usize = 32;
    let size = 64 * MIB;
    let mut s = setup("sigterm", size, Opts::default())?;
    let mut c = connect(&s.socket, 1, false)?;
    let mut q = c.take_queue(0)?;
    // After vubd exits the requests it never took never complete: a short
    // deadline ends the writer.
    q.set_timeout(Duration::from_secs(3));
    let blocks = size / BLOCK;
    let running = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&running);
    // Per block: the last generation seen complete, the last one submitted.
    type Generations = (Vec<Option<u32>>, Vec<Option<u32>>);
    let writer = std::thread::spawn(move || -> Result<Generations> {
        let mut completed: Vec<Option<u32>> = vec![None; blocks as usize];
        let mut submitted: Vec<Option<u32>> = vec![None; blocks as usize];
        let mut buf = q.alloc_buffer(QD * BLOCK as usize)?;
        let mut free: Vec<usize> = (0..QD).collect();
        let mut inflight: Vec<(u64, u32)> = vec![(0, 0); QD];
        let mut next = 0u64;
        let mut done = Vec::new();
        loop {
            while let Some(slot) = free.pop() {
                let block = next % blocks;
                let gen = (next / blocks) as u32;
                next += 1;
                let range = slot * BLOCK as usize..(slot + 1) * BLOCK as usize;
                fill_block(&mut buf.as_mut_slice()[range.clone()], block, gen);
                q.submit_write(block * BLOCK, &buf, range, slot as u64)?;
                submitted[block as usize] = Some(gen);
                inflight[slot] = (block, gen);
            }
            done.clear();
            match q.wait(1, &mut done) {
                Ok(_) => {}
                Err(e) if e.is_timeout() => return Ok((completed, submitted)),
                Err(e) => return Err(e.into()),
            }
            flag.store(true, Ordering::Relaxed);
            for d in &done {
                d.result(|| "write under SIGTERM".into())?;
                let (block, gen) = inflight[d.user_data as usize];
                completed[block as usize] = Some(gen);
                free.push(d.user_data as usize);
            }
        }
    });
    let start = Instant::now();
    while !running.load(Ordering::Relaxed) {
        ensure!(start.elapsed() < TIMEOUT, "the write load did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    s.daemon.signal(libc::SIGTERM)?;
    let status = s.daemon.wait_exit(Duration::from_secs(20))?;
    let (completed, submitted) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    drop(c);
    ensure!(status.success(), "vubd exited with {status} after SIGTERM");
    let n_done = completed.iter().filter(|g| g.is_some()).count();
    ensure!(n_done > 0, "no write completed before SIGTERM");
    let file = File::open(&s.image)?;
    let mut got = vec![0u8; BLOCK as usize];
    let mut want = vec![0u8; BLOCK as usize];
    for block in 0..blocks {
        file.read_exact_at(&mut got, block * BLOCK)?;
        let found = parse_block(&got, block);
        let (c, sub) = (completed[block as usize], submitted[block as usize]);
        let ok = match (found, c) {
            // Never completed: untouched, or the in-flight write landed.
            (None, None) => got.iter().all(|&b| b == 0),
            (Some(g), None) => Some(g) == sub,
            (None, Some(_)) => false,
            // The completed generation, or the later one that was in flight.
            (Some(g), Some(cg)) => g == cg || (Some(g) == sub && g == cg + 1),
        };
        if let Some(g) = found {
            fill_block(&mut want, block, g);
            compare(
                &format!("block {block} gen {g}"),
                block * BLOCK,
                &got,
                &want,
            )?;
        }
        ensure!(
            ok,
            "block {block}: file has generation {found:?}, client saw {c:?} complete (last submitted {sub:?})"
        );
    }
    eprintln!("{n_done} blocks verified after SIGTERM");
    Ok(())
}

const MAGIC: u64 = 0x7675_6264_7465_726d;

/// A block tagged with its index and generation, the rest derived from both.
fn fill_block(buf: &mut [u8], block: u64, gen: u32) {
    Rng(block << 32 | u64::from(gen)).fill(buf);
    buf[..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..20].copy_from_slice(&gen.to_le_bytes());
}

/// The generation a block holds, if it carries our tag for this block.
fn parse_block(buf: &[u8], block: u64) -> Option<u32> {
    let magic = u64::from_le_bytes(buf[..8].try_into().ok()?);
    let b = u64::from_le_bytes(buf[8..16].try_into().ok()?);
    (magic == MAGIC && b == block)
        .then(|| u32::from_le_bytes(buf[16..20].try_into().unwrap_or([0; 4])))
}

/// `--logical-block-size 4096` is reported to the frontend as the request
/// alignment, and aligned I/O works.
#[test]
fn logical_block_size_4096() -> Result<()> {
    if !vubd_only() {
        return Ok(());
    }
    init_log();
    let dir = ScratchDir::new("lbs")?;
    let image = dir.join("disk.img");
    create_image(&image, 8 * MIB)?;
    let socket = dir.join("vhost.sock");
    let _d = start_daemon(
        &socket,
        &image,
        Opts::default(),
        &["--logical-block-size", "4096"],
    )?;
    let mut c = connect(&socket, 1, false)?;
    ensure!(
        c.info().request_alignment == 4096,
        "request-alignment {} with --logical-block-size 4096",
        c.info().request_alignment
    );
    let mut data = vec![0u8; 3 * 4096];
    Rng(5).fill(&mut data);
    c.write(4096, &data)?;
    compare("lbs 4096", 4096, &c.read(4096, data.len())?, &data)?;
    Ok(())
}

/// Deep queues on O_DIRECT with io_uring (the engine keeps many requests
/// at the disk and completes them out of order): every queue writes its own
/// random 4k blocks at QD32, flushes, then reads random blocks back at QD32
/// and checks each one against what was written; the file is checked too.
#[test]
fn direct_deep_queues_out_of_order() -> Result<()> {
    if !vubd_only() {
        return Ok(());
    }
    const BS: usize = 4096;
    const QD: usize = 32;
    let size = 16 * MIB;
    let queues = 2usize;
    init_log();
    let dir = ScratchDir::new("direct")?;
    let image = dir.join("disk.img");
    create_image(&image, size)?;
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&image)
    {
        eprintln!("SKIPPED: no O_DIRECT in {}: {e}", dir.path().display());
        return Ok(());
    }
    let socket = dir.join("vhost.sock");
    let q = queues.to_string();
    let _daemon = Daemon::vubd(
        &socket,
        &image,
        &["--queues", &q, "--direct", "--aio", "io_uring"],
    )?;
    let mut c = connect(&socket, queues, false)?;
    let blocks = size / BS as u64;
    let mut handles = Vec::new();
    for (t, mut q) in c.take_queues().into_iter().enumerate() {
        handles.push(std::thread::spawn(move || -> Result<Vec<(u64, u64)>> {
            let mut buf = q.alloc_buffer(QD * BS)?;
            let mut rng = Rng(700 + t as u64);
            // Blocks t, t+2, t+4... in a shuffled order.
            let mut mine: Vec<u64> = (t as u64..blocks).step_by(queues).collect();
            for i in (1..mine.len()).rev() {
                mine.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut seeds = vec![0u64; mine.len()];
            let mut free: Vec<usize> = (0..QD).collect();
            let mut slot_of = vec![0usize; QD];
            let mut done: Vec<Done> = Vec::new();
            let mut next = 0;
            while next < mine.len() || q.in_flight() > 0 {
                while next < mine.len() {
                    let Some(slot) = free.pop() else { break };
                    seeds[next] = rng.next_u64();
                    let range = slot * BS..(slot + 1) * BS;
                    Rng(seeds[next]).fill(&mut buf.as_mut_slice()[range.clone()]);
                    q.submit_write(mine[next] * BS as u64, &buf, range, slot as u64)?;
                    slot_of[slot] = next;
                    next += 1;
                }
                done.clear();
                q.wait(1, &mut done)?;
                for d in &done {
                    d.result(|| format!("queue {t} write"))?;
                    free.push(d.user_data as usize);
                }
            }
            q.flush()?;
            // Random reads of our own blocks, checked as they complete.
            let mut want = vec![0u8; BS];
            let mut reads = 0;
            while reads < 2 * mine.len() || q.in_flight() > 0 {
                while reads < 2 * mine.len() {
                    let Some(slot) = free.pop() else { break };
                    let i = rng.below(mine.len() as u64) as usize;
                    slot_of[slot] = i;
                    q.submit_read(
                        mine[i] * BS as u64,
                        &buf,
                        slot * BS..(slot + 1) * BS,
                        slot as u64,
                    )?;
                    reads += 1;
                }
                done.clear();
                q.wait(1, &mut done)?;
                for d in &done {
                    d.result(|| format!("queue {t} read"))?;
                    let slot = d.user_data as usize;
                    let i = slot_of[slot];
                    Rng(seeds[i]).fill(&mut want);
                    compare(
                        &format!("queue {t} read-back"),
                        mine[i] * BS as u64,
                        &buf.as_slice()[slot * BS..(slot + 1) * BS],
                        &want,
                    )?;
                    free.push(slot);
                }
            }
            Ok(mine.into_iter().zip(seeds).collect())
        }));
    }
    let mut expected = vec![0u8; size as usize];
    for h in handles {
        let written = h
            .join()
            .map_err(|_| anyhow::anyhow!("queue thread panicked"))??;
        for (block, seed) in written {
            let off = block as usize * BS;
            Rng(seed).fill(&mut expected[off..off + BS]);
        }
    }
    drop(c);
    compare("direct image file", 0, &read_file(&image)?, &expected)?;
    Ok(())
}

/// Waits until every thread of process `pid` is in the stopped state.
fn wait_all_threads_stopped(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut all = true;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = std::fs::read_to_string(task?.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesized command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.trim_start().chars().next());
            all &= matches!(state, Some('T') | Some('t'));
        }
        if all {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "vubd did not stop after SIGSTOP");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The harness itself: a daemon that stops answering (SIGSTOP) turns into a
/// time-out error, not a hung test; after SIGCONT a new client is served.
#[test]
fn stopped_daemon_gives_a_timeout() -> Result<()> {
    let s = setup("sigstop", 8 * MIB, Opts::default())?;
    let mut c = Client::connect_with(
        &s.socket,
        &ConnectOptions {
            timeout: Duration::from_secs(1),
            ..ConnectOptions::default()
        },
    )?;
    c.write(0, &[5u8; 4096])?;
    s.daemon.signal(libc::SIGSTOP)?;
    // kill() returns before every thread has stopped: a worker still
    // finishing the write could serve the read below.
    wait_all_threads_stopped(s.daemon.pid())?;
    let t = Instant::now();
    let r = c.read(0, 4096);
    let waited = t.elapsed();
    let resumed = s.daemon.signal(libc::SIGCONT);
    ensure!(
        matches!(r, Err(ClientError::Timeout { .. })),
        "read from a stopped daemon: {r:?}"
    );
    ensure!(
        waited < Duration::from_secs(5),
        "the time-out took {waited:?}"
    );
    // The queue is unusable now; dropping the client must not hang either.
    ensure!(
        c.read(0, 512).is_err_and(|e| e.is_timeout()),
        "queue still usable"
    );
    drop(c);
    resumed?;
    check_fresh_client_works(&s)
}

//! Copy-before-write and snapshot-access on real files: the snapshot
//! equals the disk as it was at the instant the filter went in, under a
//! writer that keeps writing; the races are forced with test images that
//! park a read or a write until the test lets it go.

use super::*;
use crate::disk::{Disk, DiskError, WriteOp};
use crate::image::{Image, ImageError, RawImage, RawImageOptions};
use crate::iobuf::IoBuf;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;
const CL: u64 = 64 << 10;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vubd-cbw-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn file(&self, name: &str, fill: impl Fn(u64) -> u8) -> PathBuf {
        let p = self.0.join(name);
        let data: Vec<u8> = (0..SIZE).map(fill).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    fn sparse(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn raw(path: &Path) -> RawImage {
    RawImage::open(
        path,
        RawImageOptions {
            read_only: false,
            direct: false,
        },
    )
    .unwrap()
}

/// Lets one operation of a test image stop until released, and tells the
/// test when it has stopped.
#[derive(Default)]
struct Parker {
    /// (armed, parked, released)
    state: Mutex<(bool, bool, bool)>,
    cond: Condvar,
}

impl Parker {
    fn arm(&self) {
        *self.state.lock().unwrap() = (true, false, false);
    }

    /// Called by the image: parks the first operation after `arm`.
    fn maybe_park(&self) {
        let mut st = self.state.lock().unwrap();
        if !st.0 {
            return;
        }
        st.0 = false;
        st.1 = true;
        self.cond.notify_all();
        while !st.2 {
            st = self.cond.wait(st).unwrap();
        }
    }

    fn wait_parked(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut st = self.state.lock().unwrap();
        while !st.1 {
            assert!(Instant::now() < deadline, "the operation never parked");
            st = self
                .cond
                .wait_timeout(st, Duration::from_secs(1))
                .unwrap()
                .0;
        }
    }

    fn release(&self) {
        self.state.lock().unwrap().2 = true;
        self.cond.notify_all();
    }
}

/// A raw image whose reads or writes can be parked, or fail.
struct TestImage {
    inner: RawImage,
    reads: Parker,
    writes: Parker,
    write_count: AtomicU64,
    fail_writes: AtomicBool,
}

impl TestImage {
    fn new(path: &Path) -> Arc<TestImage> {
        Arc::new(TestImage {
            inner: raw(path),
            reads: Parker::default(),
            writes: Parker::default(),
            write_count: AtomicU64::new(0),
            fail_writes: AtomicBool::new(false),
        })
    }

    fn write_hook(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.write_count.fetch_add(1, Ordering::SeqCst);
        self.writes.maybe_park();
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(ImageError::Io {
                op: "write",
                offset,
                len,
                cause: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        Ok(())
    }
}

impl Image for TestImage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn read_at(&self, bufs: &[IoBuf], offset: u64) -> Result<(), ImageError> {
        self.reads.maybe_park();
        self.inner.read_at(bufs, offset)
    }
    fn write_at(&self, bufs: &[IoBuf], offset: u64, fua: bool) -> Result<(), ImageError> {
        self.write_hook(offset, crate::iobuf::total_len(bufs))?;
        self.inner.write_at(bufs, offset, fua)
    }
    fn flush(&self) -> Result<(), ImageError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), ImageError> {
        self.write_hook(offset, len)?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn allocated_bytes(&self) -> u64 {
        self.inner.allocated_bytes()
    }
    fn allocation(&self, offset: u64) -> Result<(bool, u64), ImageError> {
        self.inner.allocation(offset)
    }
}

/// The disk over `source`, with a filter to `target` in its path.
fn fleece(
    source: Arc<dyn Image>,
    target: Arc<dyn Image>,
    opts: CbwOptions,
) -> (Arc<Disk>, Arc<CopyBeforeWrite>) {
    let disk = Arc::new(Disk::new(Box::new(source.clone()), false));
    let cbw = CopyBeforeWrite::new(source, target, opts, None).unwrap();
    disk.add_hook(cbw.clone());
    (disk, cbw)
}

fn write(disk: &Disk, offset: u64, len: usize, byte: u8) -> Result<(), DiskError> {
    let mut buf = vec![byte; len];
    disk.write(offset, &[IoBuf::from_slice(&mut buf)])
}

fn snap(view: &SnapshotAccess, offset: u64, len: usize) -> Result<Vec<u8>, ImageError> {
    let mut buf = vec![0u8; len];
    view.read_at(&[IoBuf::from_slice(&mut buf)], offset)?;
    Ok(buf)
}

fn pattern(i: u64) -> u8 {
    (i / 512 % 251) as u8 ^ (i % 7) as u8
}

/// Waits (bounded, only against hangs) until `f` holds.
fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A writer keeps writing (data, zeroes, discards; unaligned, across
/// clusters) while the snapshot is read, scattered, many times: every
/// read equals the image saved when the filter went in, byte for byte.
#[test]
fn the_snapshot_is_the_disk_at_the_instant_under_a_writer() {
    let dir = Dir::new("writer");
    let src = dir.file("src", pattern);
    let tgt = dir.sparse("tgt");
    let before = std::fs::read(&src).unwrap();
    let (disk, cbw) = fleece(
        Arc::new(raw(&src)),
        Arc::new(raw(&tgt)),
        CbwOptions::default(),
    );
    let view = SnapshotAccess::new(cbw.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (disk, stop) = (disk.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = x % SIZE / 512 * 512;
                let len = ((x >> 32) % (3 * CL) / 512 * 512 + 512).min(SIZE - offset);
                match n % 5 {
                    3 => disk.write_zeroes(offset, len, n.is_multiple_of(2)).unwrap(),
                    4 => disk.discard(offset, len).unwrap(),
                    _ => write(&disk, offset, len as usize, (n % 200) as u8 + 1).unwrap(),
                }
                n += 1;
            }
            n
        })
    };
    let mut reads = 0u64;
    let mut y: u64 = 12345;
    while reads < 400 {
        y = y
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (y >> 20) % SIZE / 512 * 512;
        let len = ((y >> 40) % (4 * CL) + 512).min(SIZE - offset) as usize / 512 * 512;
        // Two iovecs, split off the cluster grid.
        let mut a = vec![0u8; len / 3];
        let mut b = vec![0u8; len - len / 3];
        view.read_at(
            &[IoBuf::from_slice(&mut a), IoBuf::from_slice(&mut b)],
            offset,
        )
        .unwrap();
        a.extend_from_slice(&b);
        let o = offset as usize;
        assert!(
            a == before[o..o + len],
            "snapshot differs at {offset}+{len}"
        );
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert_eq!(snap(&view, 0, SIZE as usize).unwrap(), before);
    assert!(writes >= 200);
    assert!(cbw.copied_bytes() > 0);
    // The disk itself moved on.
    assert_ne!(std::fs::read(&src).unwrap(), before);
}

/// Two writes on one cluster: the first one's copy is parked in the
/// target; the second waits for the cluster, does not copy again, and
/// neither lands before the copy is on the target.
#[test]
fn writes_on_one_cluster_copy_it_once_and_wait_for_the_copy() {
    let dir = Dir::new("ww");
    let src = dir.file("src", pattern);
    let tgt = dir.sparse("tgt");
    let before = std::fs::read(&src).unwrap();
    let target = TestImage::new(&tgt);
    let (disk, cbw) = fleece(Arc::new(raw(&src)), target.clone(), CbwOptions::default());
    target.writes.arm();
    let w1 = {
        let disk = disk.clone();
        std::thread::spawn(move || write(&disk, CL + 512, 512, 0xa1))
    };
    target.writes.wait_parked();
    let w2 = {
        let disk = disk.clone();
        std::thread::spawn(move || write(&disk, CL + 4096, 8192, 0xb2))
    };
    wait_until("the second write to wait", || {
        cbw.waiting() == 1 || w2.is_finished()
    });
    // The copy is parked: the source cluster is still the old data.
    let now = std::fs::read(&src).unwrap();
    assert!(
        now[CL as usize..2 * CL as usize] == before[CL as usize..2 * CL as usize],
        "a write landed before its cluster was copied"
    );
    target.writes.release();
    w1.join().unwrap().unwrap();
    w2.join().unwrap().unwrap();
    assert_eq!(target.write_count.load(Ordering::SeqCst), 1, "copied twice");
    let view = SnapshotAccess::new(cbw);
    assert_eq!(snap(&view, 0, SIZE as usize).unwrap(), before);
    let now = std::fs::read(&src).unwrap();
    assert_eq!(now[(CL + 512) as usize], 0xa1);
    assert_eq!(now[(CL + 4096) as usize], 0xb2);
}

/// A snapshot read of a cluster not copied yet is parked in the source;
/// a guest write on that cluster waits for it, so the read returns the
/// old data; the write then copies the old data and lands.
#[test]
fn a_snapshot_read_holds_its_cluster_against_a_guest_write() {
    let dir = Dir::new("rw");
    let src = dir.file("src", pattern);
    let tgt = dir.sparse("tgt");
    let before = std::fs::read(&src).unwrap();
    let source = TestImage::new(&src);
    let (disk, cbw) = fleece(source.clone(), Arc::new(raw(&tgt)), CbwOptions::default());
    let view = Arc::new(SnapshotAccess::new(cbw.clone()));
    source.reads.arm();
    let reader = {
        let view = view.clone();
        std::thread::spawn(move || snap(&view, 2 * CL, 2 * CL as usize))
    };
    source.reads.wait_parked();
    let writer = {
        let disk = disk.clone();
        std::thread::spawn(move || write(&disk, 3 * CL - 512, 1024, 0xc3))
    };
    wait_until("the write to wait or land", || {
        cbw.waiting() == 1 || writer.is_finished()
    });
    source.reads.release();
    let got = reader.join().unwrap().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        got == before[2 * CL as usize..4 * CL as usize],
        "the snapshot read saw the guest's write"
    );
    assert_eq!(snap(&view, 0, SIZE as usize).unwrap(), before);
    assert_eq!(std::fs::read(&src).unwrap()[(3 * CL) as usize], 0xc3);
}

/// `on-cbw-error`: a target that fails its writes fails the guest write
/// (nothing written, snapshot intact) under `break-guest-write`; under
/// `break-snapshot` the guest write lands and every snapshot read fails.
#[test]
fn a_failing_copy_breaks_the_guest_write_or_the_snapshot() {
    for on_error in [OnCbwError::BreakGuestWrite, OnCbwError::BreakSnapshot] {
        let dir = Dir::new("err");
        let src = dir.file("src", pattern);
        let tgt = dir.sparse("tgt");
        let before = std::fs::read(&src).unwrap();
        let target = TestImage::new(&tgt);
        let opts = CbwOptions {
            on_error,
            ..CbwOptions::default()
        };
        let (disk, cbw) = fleece(Arc::new(raw(&src)), target.clone(), opts);
        let view = SnapshotAccess::new(cbw);
        target.fail_writes.store(true, Ordering::SeqCst);
        let r = write(&disk, 5 * CL, 4096, 0xd4);
        let now = std::fs::read(&src).unwrap();
        if on_error == OnCbwError::BreakGuestWrite {
            assert!(matches!(r, Err(DiskError::Hook(_))), "{r:?}");
            assert_eq!(now, before, "the failed guest write landed");
            assert_eq!(snap(&view, 0, SIZE as usize).unwrap(), before);
        } else {
            r.unwrap();
            assert_eq!(now[(5 * CL) as usize], 0xd4);
            let e = snap(&view, 0, 4096).unwrap_err();
            assert!(
                matches!(&e, ImageError::Io { cause, .. } if cause.raw_os_error() == Some(libc::EIO)),
                "{e}"
            );
            // Later writes neither copy nor fail.
            target.fail_writes.store(false, Ordering::SeqCst);
            let copies = target.write_count.load(Ordering::SeqCst);
            write(&disk, 9 * CL, 4096, 0xd5).unwrap();
            assert_eq!(target.write_count.load(Ordering::SeqCst), copies);
        }
    }
}

/// `cbw-timeout`: a write that cannot get its cluster in time (a snapshot
/// read holds it) fails by the policy instead of waiting on.
#[test]
fn cbw_timeout_bounds_the_wait_for_a_held_cluster() {
    let dir = Dir::new("timeout");
    let src = dir.file("src", pattern);
    let tgt = dir.sparse("tgt");
    let source = TestImage::new(&src);
    let opts = CbwOptions {
        timeout: Some(Duration::from_millis(50)),
        ..CbwOptions::default()
    };
    let (disk, cbw) = fleece(source.clone(), Arc::new(raw(&tgt)), opts);
    let view = Arc::new(SnapshotAccess::new(cbw));
    source.reads.arm();
    let reader = {
        let view = view.clone();
        std::thread::spawn(move || snap(&view, 0, 4096))
    };
    source.reads.wait_parked();
    let r = write(&disk, 0, 512, 0xe5);
    assert!(
        matches!(&r, Err(DiskError::Hook(m)) if m.contains("timed out")),
        "{r:?}"
    );
    source.reads.release();
    reader.join().unwrap().unwrap();
    write(&disk, 0, 512, 0xe5).unwrap();
}

/// Generous, only so that a broken build fails instead of hanging.
const HANG: Duration = Duration::from_secs(20);

/// A guest request run on an io_uring engine by the "queue thread".
struct Req {
    token: u64,
    op: ReqOp,
    offset: u64,
    buf: Vec<u8>,
}

/// What a [`Req`] does.
#[derive(Clone, Copy, PartialEq)]
enum ReqOp {
    Read,
    Write,
    /// A discard of `buf`'s length (no data).
    Discard,
}

/// Completions a queue thread sends back.
type Done = std::sync::mpsc::Receiver<(u64, Result<(), DiskError>)>;

/// Runs `reqs` on one engine (one ring, as one queue thread serves all its
/// queues with), submitted in order, and sends each completion as it is
/// reaped. The buffers live in the thread until every request is reaped.
fn queue_thread(disk: Arc<Disk>, mut reqs: Vec<Req>) -> (std::thread::JoinHandle<()>, Done) {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let mut engine = crate::disk::uring::UringEngine::new(16).expect("io_uring");
        for r in &mut reqs {
            let bufs = [IoBuf::from_slice(&mut r.buf)];
            // SAFETY: the buffers stay in `reqs` until every request is
            // reaped below.
            unsafe {
                match r.op {
                    ReqOp::Write => engine.write(&disk, r.offset, &bufs, r.token),
                    ReqOp::Read => engine.read(&disk, r.offset, &bufs, r.token),
                    ReqOp::Discard => {
                        let len = r.buf.len() as u64;
                        engine.zeroes(&disk, r.offset, len, WriteOp::Discard, r.token)
                    }
                }
            }
        }
        let mut left = reqs.len();
        let deadline = Instant::now() + 3 * HANG;
        while left > 0 && Instant::now() < deadline {
            engine.submit();
            left -= engine.reap(&disk, |t, r| {
                let _ = tx.send((t, r));
            });
            if left > 0 {
                engine.wait(&[], Some(Duration::from_millis(100)));
            }
        }
    });
    (thread, rx)
}

/// One ring (one queue thread, several queues): a guest write whose
/// copy-before-write is parked in the target, and a discard of another
/// part of the same cluster (which waits for that copy), do not hold up a
/// read and a write to an already copied cluster submitted after them on
/// the same ring; the parked requests land only after the copy.
#[test]
fn a_parked_copy_does_not_stall_other_requests_on_the_ring() {
    let dir = Dir::new("ring");
    let src = dir.file("src", pattern);
    let tgt = dir.sparse("tgt");
    let before = std::fs::read(&src).unwrap();
    let target = TestImage::new(&tgt);
    let (disk, cbw) = fleece(Arc::new(raw(&src)), target.clone(), CbwOptions::default());
    // Cluster 6 is copied already.
    write(&disk, 6 * CL, 512, 0x66).unwrap();
    target.writes.arm();
    let reqs = vec![
        Req {
            token: 1,
            op: ReqOp::Write,
            offset: CL + 512,
            buf: vec![0xa1; 4096],
        },
        Req {
            token: 2,
            op: ReqOp::Read,
            offset: 8 * CL,
            buf: vec![0; 4096],
        },
        Req {
            token: 3,
            op: ReqOp::Write,
            offset: 6 * CL + 4096,
            buf: vec![0xa3; 4096],
        },
        Req {
            token: 4,
            op: ReqOp::Discard,
            offset: CL + CL / 2,
            buf: vec![0; CL as usize / 2],
        },
    ];
    let (thread, rx) = queue_thread(disk.clone(), reqs);
    target.writes.wait_parked();
    let mut others = Vec::new();
    while others.len() < 2 {
        match rx.recv_timeout(HANG) {
            Ok(done) => others.push(done),
            Err(_) => break,
        }
    }
    let now = std::fs::read(&src).unwrap();
    target.writes.release();
    let mut parked: Vec<_> = (0..2).filter_map(|_| rx.recv_timeout(HANG).ok()).collect();
    parked.sort_by_key(|d| d.0);
    thread.join().unwrap();
    let tokens: Vec<u64> = others.iter().map(|(t, _)| *t).collect();
    assert!(
        tokens.len() == 2 && !tokens.contains(&1) && !tokens.contains(&4),
        "while the copies were parked, the ring completed {tokens:?} (wanted 2 and 3)"
    );
    for (t, r) in others {
        assert!(r.is_ok(), "request {t}: {r:?}");
    }
    assert!(
        now[CL as usize..2 * CL as usize] == before[CL as usize..2 * CL as usize],
        "a write or the discard landed before their cluster was copied"
    );
    assert!(
        matches!(&parked[..], [(1, Ok(())), (4, Ok(()))]),
        "{parked:?}"
    );
    let now = std::fs::read(&src).unwrap();
    assert_eq!(now[(CL + 512) as usize], 0xa1);
    assert_eq!(now[(6 * CL + 4096) as usize], 0xa3);
    assert!(now[(CL + CL / 2) as usize..2 * CL as usize]
        .iter()
        .all(|&b| b == 0));
    let view = SnapshotAccess::new(cbw);
    assert_eq!(snap(&view, 0, SIZE as usize).unwrap(), before);
}

/// A target that never answers, `cbw-timeout` 1 s: the guest write ends
/// by `on-cbw-error` instead of hanging, on the io_uring engine and on
/// the synchronous path (`--aio sync`): under `break-snapshot` it lands
/// and the snapshot fails; under `break-guest-write` it fails with
/// nothing written.
#[test]
fn a_hung_target_fails_by_the_policy_after_cbw_timeout() {
    for uring in [true, false] {
        for on_error in [OnCbwError::BreakSnapshot, OnCbwError::BreakGuestWrite] {
            let name = format!("uring={uring} {on_error:?}");
            let dir = Dir::new("hung");
            let src = dir.file("src", pattern);
            let tgt = dir.sparse("tgt");
            let before = std::fs::read(&src).unwrap();
            let target = TestImage::new(&tgt);
            let opts = CbwOptions {
                on_error,
                timeout: Some(Duration::from_secs(1)),
                ..CbwOptions::default()
            };
            let (disk, cbw) = fleece(Arc::new(raw(&src)), target.clone(), opts);
            let view = SnapshotAccess::new(cbw);
            target.writes.arm();
            let (thread, rx) = match uring {
                true => {
                    let req = Req {
                        token: 7,
                        op: ReqOp::Write,
                        offset: 5 * CL,
                        buf: vec![0xd4; 4096],
                    };
                    queue_thread(disk.clone(), vec![req])
                }
                false => {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let disk = disk.clone();
                    let t = std::thread::spawn(move || {
                        let _ = tx.send((7, write(&disk, 5 * CL, 4096, 0xd4)));
                    });
                    (t, rx)
                }
            };
            let result = rx.recv_timeout(HANG);
            let now = std::fs::read(&src).unwrap();
            let read = snap(&view, 0, 4096);
            // Let the hung copy go, so that no thread is left behind.
            target.writes.release();
            thread.join().unwrap();
            let Ok((7, result)) = result else {
                panic!("{name}: the guest write hung on the target");
            };
            if on_error == OnCbwError::BreakGuestWrite {
                assert!(
                    matches!(&result, Err(DiskError::Hook(m)) if m.contains("timed out")),
                    "{name}: {result:?}"
                );
                assert_eq!(now, before, "{name}: the failed guest write landed");
            } else {
                assert!(result.is_ok(), "{name}: {result:?}");
                assert_eq!(now[(5 * CL) as usize], 0xd4, "{name}");
                assert!(read.is_err(), "{name}: the snapshot still reads");
            }
        }
    }
}

/// Discard on the snapshot: the clusters leave it (reads fail with
/// EACCES), guest writes no longer copy them; block status reports the
/// source's holes as holes, before and after a copy.
#[test]
fn snapshot_discard_and_block_status() {
    let dir = Dir::new("discard");
    let src = dir.file("src", pattern);
    let tgt = dir.sparse("tgt");
    let source: Arc<dyn Image> = Arc::new(raw(&src));
    // A hole in the source at [1 MiB, 2 MiB).
    source.discard(1 << 20, 1 << 20).unwrap();
    let target = TestImage::new(&tgt);
    let (disk, cbw) = fleece(source, target.clone(), CbwOptions::default());
    let view = SnapshotAccess::new(cbw);
    let (data, n) = view.allocation(1 << 20).unwrap();
    assert!(!data, "the source's hole is reported as data");
    assert!((CL..=1 << 20).contains(&n), "{n}");
    // The guest writes into the hole: the copy of zeroes stays a hole.
    write(&disk, 1 << 20, 4096, 1).unwrap();
    assert!(!view.allocation(1 << 20).unwrap().0);
    assert!(snap(&view, 1 << 20, 4096).unwrap().iter().all(|&b| b == 0));
    assert!(view.allocation(0).unwrap().0);
    // Outside the snapshot: refused, not a panic.
    assert!(snap(&view, SIZE - 512, 1024).is_err());
    assert!(view.read_at(&[], u64::MAX).is_err());
    assert!(view.allocation(SIZE).is_err());
    view.discard(0, 2 * CL + 100).unwrap();
    let e = snap(&view, CL, 512).unwrap_err();
    assert!(
        matches!(&e, ImageError::Io { cause, .. } if cause.raw_os_error() == Some(libc::EACCES)),
        "{e}"
    );
    let copies = target.write_count.load(Ordering::SeqCst);
    write(&disk, 0, 2 * CL as usize, 7).unwrap();
    assert_eq!(target.write_count.load(Ordering::SeqCst), copies);
    // The partial cluster at the end of the discard stays readable.
    let want: Vec<u8> = (2 * CL..2 * CL + 512).map(pattern).collect();
    assert_eq!(snap(&view, 2 * CL, 512).unwrap(), want);
}

mod qmp {
    //! `transaction` with `blockdev-backup` on the real engine: the filter
    //! goes into the guest's path at the commit instant, with the bitmap
    //! changes; a failed transaction and a cancelled job leave no filter.

    use super::*;
    use crate::dirty::{DirtyTracker, TrackerConfig};
    use crate::graph::qmp::{graph_for_disk, register_graph_commands};
    use crate::jobs::JobRegistry;
    use crate::qmp::{
        standard_dispatcher, DirtyBitmaps, DiskInfo, Dispatcher, EventBus, ManagementContext,
        QmpError,
    };
    use serde_json::{json, Value};

    struct Ctx {
        disk: Arc<Disk>,
        tracker: Arc<DirtyTracker>,
    }

    impl ManagementContext for Ctx {
        fn node_name(&self) -> String {
            "disk0".into()
        }
        fn disk_info(&self) -> DiskInfo {
            DiskInfo {
                image: self.disk.image().path().to_path_buf(),
                size: SIZE,
                read_only: false,
                direct: false,
                writeback: true,
            }
        }
        fn bitmaps(&self) -> Option<Arc<dyn DirtyBitmaps>> {
            Some(self.tracker.clone())
        }
        fn quit(&self) {}
        fn with_guest_io_held(&self, f: &mut dyn FnMut()) -> Result<(), QmpError> {
            let _pause = self.disk.gate().pause();
            f();
            Ok(())
        }
    }

    struct Setup {
        _dir: Dir,
        disk: Arc<Disk>,
        tracker: Arc<DirtyTracker>,
        graph: Arc<crate::graph::Graph>,
        d: Arc<Dispatcher>,
        tmp: PathBuf,
        before: Vec<u8>,
    }

    fn setup(tag: &str) -> Setup {
        let dir = Dir::new(tag);
        let src = dir.file("src", pattern);
        let tmp = dir.sparse("tmp");
        let before = std::fs::read(&src).unwrap();
        let disk = Arc::new(Disk::new(Box::new(raw(&src)), false));
        let tracker = Arc::new(DirtyTracker::open(TrackerConfig::for_image(&src, SIZE)).unwrap());
        disk.add_hook(tracker.clone());
        let ctx = Arc::new(Ctx {
            disk: disk.clone(),
            tracker: tracker.clone(),
        });
        let events = EventBus::new();
        let d = standard_dispatcher(ctx.clone(), events.clone());
        let graph = Arc::new(graph_for_disk(&disk, "disk0", false));
        register_graph_commands(&d, graph.clone(), ctx.clone());
        let jobs = JobRegistry::new(events);
        crate::jobs::qmp::register_job_commands(&d, jobs.clone());
        crate::graph::qmp::register_filter_commands(
            &d,
            graph.clone(),
            crate::graph::cbw::Filters {
                disk: disk.clone(),
                ctx: ctx.clone(),
                jobs: jobs.clone(),
            },
        );
        let svc = Arc::new(qmp::BackupService {
            disk: disk.clone(),
            graph: graph.clone(),
            jobs,
            ctx,
        });
        qmp::register_backup_commands(&d, svc);
        exec(
            &d,
            "blockdev-add",
            json!({"driver": "file", "node-name": "tmp0", "filename": tmp}),
        )
        .unwrap();
        Setup {
            _dir: dir,
            disk,
            tracker,
            graph,
            d,
            tmp,
            before,
        }
    }

    use super::super::qmp;

    fn exec(d: &Dispatcher, cmd: &str, args: Value) -> Result<Value, QmpError> {
        match args {
            Value::Object(m) => d.execute(cmd, m),
            _ => d.execute(cmd, Default::default()),
        }
    }

    fn backup() -> Value {
        json!({"type": "blockdev-backup", "data": {"job-id": "fl0", "device": "disk0",
               "target": "tmp0", "sync": "none", "filter-node-name": "cbw0"}})
    }

    fn read_node(graph: &crate::graph::Graph, node: &str, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        graph
            .lookup(node)
            .unwrap()
            .image()
            .read_at(&[IoBuf::from_slice(&mut buf)], offset)
            .unwrap();
        buf
    }

    /// A guest write that starts after the transaction's prepare and
    /// before its commit (it holds the gate the commit waits for): it is
    /// before the instant for the bitmaps (in b0, not in b1), so it must
    /// be in the snapshot too: not copied by a filter already in the path.
    #[test]
    fn the_filter_goes_in_at_the_commit_instant() {
        let s = setup("instant");
        exec(
            &s.d,
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0"}),
        )
        .unwrap();
        let (entered, in_gate) = std::sync::mpsc::channel();
        let writer = {
            let disk = s.disk.clone();
            std::thread::spawn(move || {
                let _batch = disk.gate().enter();
                let _ = entered.send(());
                // The transaction is prepared and waits for this batch.
                wait_until("the commit to wait for guest I/O", || {
                    disk.gate().is_paused()
                });
                write(&disk, 3 * CL, 4096, 0xee)
            })
        };
        in_gate.recv().unwrap();
        let txn = json!({"actions": [
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b1"}},
            backup()]});
        exec(&s.d, "transaction", txn).unwrap();
        writer.join().unwrap().unwrap();
        let b0 = s.tracker.bitmap("b0").unwrap();
        let b1 = s.tracker.bitmap("b1").unwrap();
        assert!(
            b0.get(3 * CL) && !b1.get(3 * CL),
            "the write is before the instant"
        );
        exec(
            &s.d,
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "acc0", "file": "cbw0"}),
        )
        .unwrap();
        assert!(
            read_node(&s.graph, "acc0", 3 * CL, 4096) == vec![0xee; 4096],
            "the snapshot is older than the bitmaps' instant"
        );
        // A write after the instant: in b1, not in the snapshot.
        write(&s.disk, 5 * CL, 512, 0xef).unwrap();
        assert!(b1.get(5 * CL));
        let o = (5 * CL) as usize;
        assert!(read_node(&s.graph, "acc0", 5 * CL, 512) == s.before[o..o + 512]);
    }

    /// The same for `blockdev-add driver=copy-before-write`: a guest write
    /// already inside the gate when the node is added lands before the
    /// instant (in the snapshot), the first one after it is copied first.
    #[test]
    fn a_cbw_node_goes_in_after_the_writes_in_flight() {
        let s = setup("cbw-instant");
        let (entered, in_gate) = std::sync::mpsc::channel();
        let writer = {
            let disk = s.disk.clone();
            std::thread::spawn(move || {
                let _batch = disk.gate().enter();
                let _ = entered.send(());
                // blockdev-add waits for this batch before inserting.
                wait_until("blockdev-add to wait for guest I/O", || {
                    disk.gate().is_paused()
                });
                write(&disk, 3 * CL, 4096, 0xee)
            })
        };
        in_gate.recv().unwrap();
        exec(
            &s.d,
            "blockdev-add",
            json!({"driver": "copy-before-write", "node-name": "cbw1",
                   "file": "disk0", "target": "tmp0"}),
        )
        .unwrap();
        writer.join().unwrap().unwrap();
        exec(
            &s.d,
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "acc0", "file": "cbw1"}),
        )
        .unwrap();
        assert!(
            read_node(&s.graph, "acc0", 3 * CL, 4096) == vec![0xee; 4096],
            "a write in flight at the insertion is missing from the snapshot"
        );
        write(&s.disk, 5 * CL, 512, 0xef).unwrap();
        let o = (5 * CL) as usize;
        assert!(
            read_node(&s.graph, "acc0", 5 * CL, 512) == s.before[o..o + 512],
            "a write after the insertion reached the snapshot"
        );
    }

    /// A transaction whose last action fails leaves no filter in the
    /// path and no node; a cancelled job takes its filter out (writes no
    /// longer copy, the snapshot fails with EIO) and frees the target.
    #[test]
    fn abort_and_cancel_leave_no_filter() {
        let s = setup("abort");
        let e = exec(
            &s.d,
            "transaction",
            json!({"actions": [backup(), {"type": "abort", "data": {}}]}),
        )
        .unwrap_err();
        assert_eq!(e.desc, "Transaction aborted using Abort action");
        assert!(s.graph.lookup("cbw0").is_none());
        write(&s.disk, 0, 4096, 1).unwrap();
        let unallocated = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().blocks() == 0
        };
        assert!(unallocated(&s.tmp), "a write was copied after the abort");

        exec(&s.d, "transaction", json!({"actions": [backup()]})).unwrap();
        exec(
            &s.d,
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "acc0", "file": "cbw0"}),
        )
        .unwrap();
        let acc = s.graph.lookup("acc0").unwrap();
        write(&s.disk, CL, 4096, 2).unwrap();
        assert!(!unallocated(&s.tmp), "the write was not copied");
        exec(&s.d, "block-job-cancel", json!({"device": "fl0"})).unwrap();
        wait_until("the job to end", || s.graph.lookup("cbw0").is_none());
        let copied = std::fs::read(&s.tmp).unwrap();
        write(&s.disk, 7 * CL, 4096, 3).unwrap();
        assert_eq!(
            std::fs::read(&s.tmp).unwrap(),
            copied,
            "copied after cancel"
        );
        let mut buf = vec![0u8; 512];
        assert!(acc
            .image()
            .read_at(&[IoBuf::from_slice(&mut buf)], 0)
            .is_err());
        exec(&s.d, "blockdev-del", json!({"node-name": "acc0"})).unwrap();
        exec(&s.d, "blockdev-del", json!({"node-name": "tmp0"})).unwrap();
    }

    /// The job's progress, as `query-block-jobs` shows it.
    fn offset(s: &Setup) -> u64 {
        let jobs = exec(&s.d, "query-block-jobs", json!({})).unwrap();
        jobs[0]["offset"].as_u64().unwrap_or(0)
    }

    fn clusters(s: &Setup, name: &str) -> Vec<u64> {
        let b = s.tracker.bitmap(name).unwrap();
        (0..SIZE / CL).filter(|&c| b.get(c * CL)).collect()
    }

    /// `sync: bitmap` on a persistent bitmap with the bits {1, 2, 40, 50}
    /// (the copy set C): the job copies piece 0 (clusters 1, 2), then
    /// waits (speed); a write on cluster 40 (in C, not copied yet: the
    /// filter copies it) and one on cluster 5 (not in C) land during the
    /// job. Cancelled there: `on-success` and `never` keep C and the
    /// writes, `always` keeps the writes and cluster 50 (not copied). Run to the end: `on-success` and `always`
    /// keep only the writes since the start, `never` keeps everything.
    /// The target holds C's clusters as they were at the start, and
    /// nothing else.
    #[test]
    fn bitmap_backup_settles_its_bitmap_by_mode() {
        for (mode, cancel, want) in [
            ("on-success", true, vec![1, 2, 5, 40, 50]),
            ("never", true, vec![1, 2, 5, 40, 50]),
            ("always", true, vec![5, 40, 50]),
            ("on-success", false, vec![5, 40]),
            ("never", false, vec![1, 2, 5, 40, 50]),
            ("always", false, vec![5, 40]),
        ] {
            let s = setup("bitmap");
            exec(
                &s.d,
                "block-dirty-bitmap-add",
                json!({"node": "disk0", "name": "b0", "persistent": true}),
            )
            .unwrap();
            for c in [1, 2, 40, 50] {
                write(&s.disk, c * CL + 512, 512, 0xa0 + c as u8).unwrap();
            }
            let start = std::fs::read(s.disk.image().path()).unwrap();
            exec(
                &s.d,
                "blockdev-backup",
                json!({"job-id": "j", "device": "disk0", "target": "tmp0", "sync": "bitmap",
                       "bitmap": "b0", "bitmap-mode": mode, "speed": 1, "auto-finalize": false}),
            )
            .unwrap();
            wait_until("piece 0 to be copied", || offset(&s) == 2 * CL);
            let info = s.tracker.list();
            assert!(info[0].busy && info[0].recording, "{mode}: {info:?}");
            write(&s.disk, 40 * CL, 4096, 0xee).unwrap();
            write(&s.disk, 5 * CL, 4096, 0xef).unwrap();
            // Still recording: what is stored covers C and the writes.
            assert_eq!(clusters(&s, "b0"), vec![1, 2, 5, 40, 50], "{mode}");
            if cancel {
                exec(&s.d, "block-job-cancel", json!({"device": "j"})).unwrap();
            } else {
                exec(
                    &s.d,
                    "block-job-set-speed",
                    json!({"device": "j", "speed": 0}),
                )
                .unwrap();
                wait_until("the job to be pending", || {
                    let jobs = exec(&s.d, "query-jobs", json!({})).unwrap();
                    jobs[0]["status"] == "pending"
                });
                exec(&s.d, "job-finalize", json!({"id": "j"})).unwrap();
            }
            wait_until("the job to end", || {
                s.graph.lookup("j").is_none() && {
                    exec(&s.d, "query-jobs", json!({}))
                        .unwrap()
                        .as_array()
                        .is_some_and(|a| a.is_empty())
                }
            });
            assert_eq!(clusters(&s, "b0"), want, "{mode}, cancel {cancel}");
            let info = s.tracker.list();
            assert!(!info[0].busy && info[0].recording, "{mode}: {info:?}");
            let target = std::fs::read(&s.tmp).unwrap();
            for c in 0..SIZE / CL {
                let r = (c * CL) as usize..((c + 1) * CL) as usize;
                let copied = [1, 2, 40].contains(&c) || (c == 50 && !cancel);
                if copied {
                    assert!(
                        target[r.clone()] == start[r],
                        "{mode}: cluster {c} is not the start's"
                    );
                } else {
                    assert!(
                        target[r].iter().all(|&b| b == 0),
                        "{mode}: cluster {c} was copied"
                    );
                }
            }
            // A later write is recorded by the bitmap itself again.
            write(&s.disk, 60 * CL, 512, 1).unwrap();
            assert!(s.tracker.bitmap("b0").unwrap().get(60 * CL));
        }
    }

    /// A transaction whose last action fails after a `sync: bitmap`
    /// backup leaves no trace: no job, no filter node, the bitmap not busy
    /// and with its bits; a later backup on it is accepted.
    #[test]
    fn a_failed_transaction_releases_the_backup_bitmap() {
        let s = setup("txnbitmap");
        exec(
            &s.d,
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0", "persistent": true}),
        )
        .unwrap();
        write(&s.disk, 3 * CL, 512, 7).unwrap();
        let action = json!({"type": "blockdev-backup", "data": {"job-id": "j", "device": "disk0",
            "target": "tmp0", "sync": "incremental", "bitmap": "b0", "filter-node-name": "f0"}});
        let e = exec(
            &s.d,
            "transaction",
            json!({"actions": [action.clone(), {"type": "abort", "data": {}}]}),
        )
        .unwrap_err();
        assert_eq!(e.desc, "Transaction aborted using Abort action");
        assert!(s.graph.lookup("f0").is_none());
        assert_eq!(exec(&s.d, "query-jobs", json!({})).unwrap(), json!([]));
        let info = s.tracker.list();
        assert!(!info[0].busy, "the bitmap stayed busy: {info:?}");
        assert_eq!(clusters(&s, "b0"), vec![3]);
        exec(&s.d, "transaction", json!({"actions": [action]})).unwrap();
        wait_until("the job to end", || {
            exec(&s.d, "query-jobs", json!({}))
                .unwrap()
                .as_array()
                .is_some_and(|a| a.is_empty())
        });
        assert_eq!(clusters(&s, "b0"), Vec::<u64>::new());
    }
}

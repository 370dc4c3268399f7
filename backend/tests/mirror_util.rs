//! Shared helpers of the mirror tests (included with `#[path]`): scratch
//! directories on /dev/shm, patterned images, a disk + job registry + QMP
//! dispatcher, and guest writer threads that keep a model of what the disk
//! must contain.
#![allow(dead_code)]

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vubd_backend::jobs::{Job, JobRegistry, JobStatus};
use vubd_backend::mirror::MirrorManager;
use vubd_backend::qmp::{Dispatcher, Event, EventBus, VersionInfo};
use vubd_backend::{Disk, IoBuf, RawImage, RawImageOptions};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let p = base.join(format!(
            "vubd-mtest-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic bytes for (block, generation).
pub fn pattern(block: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Creates a sparse image of `size` bytes with data in every `data_every`-th
/// MiB (1 = fully written); returns the model of its contents.
pub fn make_image(path: &Path, size: u64, data_every: u64) -> Result<Vec<u8>> {
    let f = File::create(path)?;
    f.set_len(size)?;
    let mut model = vec![0u8; size as usize];
    let mut off = 0;
    while off < size {
        let n = MIB.min(size - off);
        if (off / MIB).is_multiple_of(data_every) {
            let data = pattern(off / MIB, 0, n as usize);
            f.write_all_at(&data, off)?;
            model[off as usize..(off + n) as usize].copy_from_slice(&data);
        }
        off += n;
    }
    f.sync_all()?;
    Ok(model)
}

pub fn open_disk(path: &Path) -> Result<Arc<Disk>> {
    let img = RawImage::open(path, RawImageOptions::default())?;
    Ok(Arc::new(Disk::new(Box::new(img), false)))
}

/// A disk with the block-job machinery a daemon would wire up.
pub struct Rig {
    pub disk: Arc<Disk>,
    pub image: PathBuf,
    pub registry: Arc<JobRegistry>,
    pub manager: Arc<MirrorManager>,
    pub qmp: Arc<Dispatcher>,
    pub events: Receiver<Arc<Event>>,
}

impl Rig {
    pub fn new(image: &Path) -> Result<Rig> {
        Rig::with_disk(open_disk(image)?, image)
    }

    /// A rig around an existing disk whose image file is `image`.
    pub fn with_disk(disk: Arc<Disk>, image: &Path) -> Result<Rig> {
        let bus = EventBus::new();
        let (_sub, events) = bus.subscribe_channel(100_000);
        let registry = JobRegistry::new(bus.clone());
        let manager = MirrorManager::new(disk.clone(), "disk0", image, false, registry.clone())?;
        let qmp = Dispatcher::new(bus, VersionInfo::default());
        vubd_backend::mirror::qmp::register_block_job_commands(&qmp, manager.clone());
        let graph = Arc::new(vubd_backend::graph::qmp::graph_for_disk(
            &disk, "disk0", false,
        ));
        manager.attach_graph(graph.clone());
        vubd_backend::graph::qmp::register_node_commands(&qmp, graph);
        Ok(Rig {
            disk,
            image: image.to_path_buf(),
            registry,
            manager,
            qmp,
            events,
        })
    }

    /// Runs a QMP command; the error's text on failure.
    pub fn qmp(&self, name: &str, args: Value) -> std::result::Result<Value, String> {
        let Value::Object(m) = args else {
            return Err("arguments must be an object".into());
        };
        self.qmp.execute(name, m).map_err(|e| e.desc)
    }

    pub fn job(&self, id: &str) -> Result<Arc<Job>> {
        self.registry.get(id).context("no such job")
    }

    /// Event names so far ("JOB_STATUS_CHANGE" shown as its status).
    pub fn event_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            let d = e.data.clone().unwrap_or(Value::Null);
            out.push(match e.name.as_str() {
                "JOB_STATUS_CHANGE" => d["status"].as_str().unwrap_or("?").to_string(),
                "BLOCK_JOB_ERROR" => format!(
                    "ERROR:{}:{}",
                    d["operation"].as_str().unwrap_or("?"),
                    d["action"].as_str().unwrap_or("?")
                ),
                n => n.to_string(),
            });
        }
        out
    }

    /// Every event so far with its data.
    pub fn drain_events(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            out.push((e.name.clone(), e.data.clone().unwrap_or(Value::Null)));
        }
        out
    }

    pub fn block_job(&self) -> Result<Value> {
        let v = self
            .qmp("query-block-jobs", json!({}))
            .map_err(anyhow::Error::msg)?;
        Ok(v.get(0).cloned().unwrap_or(Value::Null))
    }
}

/// Waits until `job` is in `status`.
pub fn wait_status(job: &Job, status: JobStatus, timeout: Duration) -> Result<()> {
    let got = job.wait_for(&[status], timeout);
    if got != status {
        bail!(
            "job '{}' is {got}, expected {status} within {timeout:?}",
            job.id()
        );
    }
    Ok(())
}

/// Guest writer threads: each owns the blocks `b` with `b % n == index`, so
/// the model of the last write per block is exact without locking the I/O.
pub struct Writers {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<u64>>>,
    pub model: Arc<Mutex<Vec<u8>>>,
    pub block: u64,
}

impl Writers {
    /// Starts `n` writers of `block`-byte writes over the first `span` bytes;
    /// one request in 16 is a write-zeroes, one in 32 a discard when `mixed`.
    pub fn start(
        disk: &Arc<Disk>,
        model: Vec<u8>,
        n: u64,
        block: u64,
        span: u64,
        mixed: bool,
        pace: Option<Duration>,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let model = Arc::new(Mutex::new(model));
        let blocks = span / block;
        let threads = (0..n)
            .map(|t| {
                let (disk, stop, model) = (disk.clone(), stop.clone(), model.clone());
                let done = done.clone();
                std::thread::spawn(move || -> Result<u64> {
                    let mut x = 0x1234_5678_9abc_def1u64 ^ (t + 1).wrapping_mul(0x9e37_79b9);
                    let mut writes = 0u64;
                    let mut generation = 1u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let b = (x % (blocks / n).max(1)) * n + t;
                        if b >= blocks {
                            continue;
                        }
                        let off = b * block;
                        let kind = if mixed { (x >> 40) % 32 } else { 1 };
                        let data = if kind == 0 || kind == 16 {
                            vec![0u8; block as usize]
                        } else {
                            pattern(b, generation * 64 + t, block as usize)
                        };
                        {
                            let _batch = disk.gate().enter();
                            match kind {
                                0 => disk.discard(off, block)?,
                                16 => disk.write_zeroes(off, block, (x >> 20) & 1 == 1)?,
                                _ => {
                                    let mut buf = data.clone();
                                    disk.write(off, &[IoBuf::from_slice(&mut buf)])?;
                                }
                            }
                            // The model is updated while the request is
                            // still "in flight" (inside the batch): a pivot
                            // cannot fall between the write and the model.
                            let mut m = model.lock().expect("model");
                            m[off as usize..(off + block) as usize].copy_from_slice(&data);
                        }
                        generation += 1;
                        writes += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                        if let Some(p) = pace {
                            std::thread::sleep(p);
                        }
                    }
                    Ok(writes)
                })
            })
            .collect();
        Writers {
            stop,
            done,
            threads,
            model,
            block,
        }
    }

    /// Waits until the writers have done `more` writes from now on.
    pub fn wait_writes(&self, more: u64, timeout: Duration) -> Result<()> {
        wait_count(&self.done, more, timeout)
    }

    /// Stops the writers; returns the total number of writes.
    pub fn stop(self) -> Result<(u64, Vec<u8>)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in self.threads {
            total += t.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        let model = Arc::try_unwrap(self.model)
            .map_err(|_| anyhow::anyhow!("model still shared"))?
            .into_inner()
            .map_err(|_| anyhow::anyhow!("model poisoned"))?;
        Ok((total, model))
    }
}

/// Waits until `counter` has grown by `more`: a test that needs the guest
/// to have written while something happened counts writes, not time.
fn wait_count(counter: &AtomicU64, more: u64, timeout: Duration) -> Result<()> {
    let goal = counter.load(Ordering::Relaxed) + more;
    let t0 = Instant::now();
    while counter.load(Ordering::Relaxed) < goal {
        if t0.elapsed() > timeout {
            bail!("the writers did not write {more} times within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Guest writer threads whose writes overlap on purpose: all of them write
/// into the same `span` bytes, 4 KiB inside a `chunk` (data, write-zeroes,
/// discards) and whole chunks, so that two writes are often in flight on
/// one chunk at once. They keep no model: the test compares the target
/// with the source once they have stopped.
pub struct Overlapping {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<u64>>>,
}

impl Overlapping {
    /// Starts `n` threads over the first `span` bytes of `disk`.
    pub fn start(disk: &Arc<Disk>, n: u64, span: u64, chunk: u64) -> Overlapping {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|t| {
                let (disk, stop, done) = (disk.clone(), stop.clone(), done.clone());
                std::thread::spawn(move || -> Result<u64> {
                    let mut x = 0x5851_f42d_4c95_7f2du64 ^ (t + 1).wrapping_mul(0x9e37_79b9);
                    let mut writes = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let c = (x >> 8) % (span / chunk);
                        let small = c * chunk + (x >> 32) % (chunk / 4096) * 4096;
                        let _batch = disk.gate().enter();
                        match x % 32 {
                            0 => disk.discard(small, 4096)?,
                            1 | 2 => disk.write_zeroes(small, 4096, x & 64 != 0)?,
                            3..=10 => {
                                let mut buf = pattern(c, x, chunk as usize);
                                disk.write(c * chunk, &[IoBuf::from_slice(&mut buf)])?;
                            }
                            _ => {
                                let mut buf = pattern(small, x, 4096);
                                disk.write(small, &[IoBuf::from_slice(&mut buf)])?;
                            }
                        }
                        writes += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(writes)
                })
            })
            .collect();
        Overlapping {
            stop,
            done,
            threads,
        }
    }

    /// Waits until the threads have done `more` writes from now on.
    pub fn wait_writes(&self, more: u64, timeout: Duration) -> Result<()> {
        wait_count(&self.done, more, timeout)
    }

    /// Stops the threads; returns the number of writes.
    pub fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in self.threads {
            total += t.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok(total)
    }
}

/// Compares a file with the expected bytes; reports the first differing
/// 4 KiB blocks.
pub fn compare_file(path: &Path, expect: &[u8]) -> Result<()> {
    let got = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if got.len() < expect.len() {
        bail!(
            "{} is {} bytes, expected {}",
            path.display(),
            got.len(),
            expect.len()
        );
    }
    let bad: Vec<usize> = (0..expect.len().div_ceil(4096))
        .filter(|&b| {
            let r = b * 4096..((b + 1) * 4096).min(expect.len());
            got[r.clone()] != expect[r]
        })
        .collect();
    if !bad.is_empty() {
        bail!(
            "{}: {} of {} 4 KiB blocks differ, first at blocks {:?}",
            path.display(),
            bad.len(),
            expect.len().div_ceil(4096),
            &bad[..bad.len().min(8)]
        );
    }
    Ok(())
}

/// Bytes allocated to a file.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

pub fn elapsed_ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

/// What a [`Flaky`] image is about to do, for its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Discard,
    WriteZeroes,
    Flush,
}

impl Op {
    /// Whether the operation changes data.
    pub fn writes(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes)
    }
}

/// Called with each operation and its offset before a [`Flaky`] image
/// does it: may sleep, park or record.
pub type OpHook = Box<dyn Fn(Op, u64) + Send + Sync>;

/// The test image: a raw image with faults on demand. Before each
/// operation it runs its hook; then writes (and write-zeroes and flushes)
/// fail with ENOSPC while `fail_writes`, reads with EIO while `fail_reads`.
/// Identity is forwarded (mirrors tell images apart by it: a wrapper is
/// the file it wraps).
pub struct Flaky {
    pub inner: RawImage,
    pub fail_writes: AtomicBool,
    pub fail_reads: AtomicBool,
    pub failures: AtomicU64,
    hook: Option<OpHook>,
}

impl Flaky {
    pub fn open(path: &Path) -> Result<Flaky> {
        Ok(Flaky {
            inner: RawImage::open(path, RawImageOptions::default())?,
            fail_writes: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            hook: None,
        })
    }

    /// With a hook run before every operation.
    pub fn with_hook(path: &Path, hook: impl Fn(Op, u64) + Send + Sync + 'static) -> Result<Flaky> {
        Ok(Flaky {
            hook: Some(Box::new(hook)),
            ..Flaky::open(path)?
        })
    }

    /// On slow storage: every write-type request waits 100 us before it is
    /// issued, so the guest's data lands a while after the mirror's mark
    /// (the window the after-write mark closes).
    pub fn slow(path: &Path) -> Result<Flaky> {
        Flaky::with_hook(path, |op, _| {
            if op.writes() {
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    }

    fn before(&self, op: Op, offset: u64) {
        if let Some(hook) = &self.hook {
            hook(op, offset);
        }
    }

    fn check(
        &self,
        flag: &AtomicBool,
        op: &'static str,
        offset: u64,
        len: u64,
        errno: i32,
    ) -> std::result::Result<(), vubd_backend::ImageError> {
        if !flag.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        Err(vubd_backend::ImageError::Io {
            op,
            offset,
            len,
            cause: std::io::Error::from_raw_os_error(errno),
        })
    }
}

impl vubd_backend::Image for Flaky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn read_at(
        &self,
        bufs: &[IoBuf],
        offset: u64,
    ) -> std::result::Result<(), vubd_backend::ImageError> {
        self.before(Op::Read, offset);
        self.check(&self.fail_reads, "read", offset, 0, libc_eio())?;
        self.inner.read_at(bufs, offset)
    }
    fn write_at(
        &self,
        bufs: &[IoBuf],
        offset: u64,
        fua: bool,
    ) -> std::result::Result<(), vubd_backend::ImageError> {
        self.before(Op::Write, offset);
        self.check(&self.fail_writes, "write", offset, 0, ENOSPC)?;
        self.inner.write_at(bufs, offset, fua)
    }
    fn flush(&self) -> std::result::Result<(), vubd_backend::ImageError> {
        self.before(Op::Flush, 0);
        self.check(&self.fail_writes, "flush", 0, 0, ENOSPC)?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::result::Result<(), vubd_backend::ImageError> {
        self.before(Op::Discard, offset);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> std::result::Result<(), vubd_backend::ImageError> {
        self.before(Op::WriteZeroes, offset);
        self.check(&self.fail_writes, "write-zeroes", offset, len, ENOSPC)?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn allocated_bytes(&self) -> u64 {
        self.inner.allocated_bytes()
    }
    fn allocation(
        &self,
        offset: u64,
    ) -> std::result::Result<(bool, u64), vubd_backend::ImageError> {
        self.check(&self.fail_reads, "seek", offset, 0, libc_eio())?;
        self.inner.allocation(offset)
    }
    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.identity()
    }
    // `async_fd` stays the default (none): every request then comes through
    // the methods above, so the hook and the faults see it.
}

pub const ENOSPC: i32 = 28;

fn libc_eio() -> i32 {
    5
}

/// Closes every descriptor of this process that is open on `path`: the
/// in-process stand-in for a restart's closing them (and their image
/// locks), for a forgotten daemon whose jobs are paused.
pub fn close_fds_of(path: &Path) -> Result<()> {
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        if std::fs::read_link(entry.path()).is_ok_and(|target| target == path) {
            if let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() {
                // SAFETY: the caller's promise: the descriptor belongs to a
                // daemon that was forgotten (never dropped, its jobs paused)
                // and is not used again.
                unsafe { libc::close(fd) };
            }
        }
    }
    Ok(())
}

//! The pivot's pause: what runs while guest I/O is paused at `job-complete`.
//!
//! A slow target (every flush sleeps) and a persistent bitmap whose sidecar
//! moves to the target at the pivot. The target and the sidecar record, for
//! each operation, whether the disk's gate was paused when it started, so
//! the tests check what happened inside the pause by order and counters,
//! not by the clock:
//! - the target flush and the sidecar's full write happen before the pause;
//! - chunks copied under the pause are flushed under it (a write the guest
//!   flushed on the source must be durable on the target it runs on next);
//! - a pause that finds too much dirty is given up and retried, so the
//!   guest is not stalled for the copy of a burst of writes.

#[path = "mirror_util.rs"]
mod util;

use anyhow::{ensure, Result};
use serde_json::json;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use util::*;
use vubd_backend::dirty::{sidecar_path, DirtyTracker, FileStore, MetaStore, TrackerConfig};
use vubd_backend::jobs::JobStatus;
use vubd_backend::mirror::manager::TargetMode;
use vubd_backend::mirror::{MirrorManager, MirrorRequest};
use vubd_backend::{Disk, Image, IoBuf};

const T: Duration = Duration::from_secs(60);
/// A slow target's flush (a remote or busy device).
const FLUSH_DELAY: Duration = Duration::from_millis(100);

/// The gate of the disk an image or store belongs to, set once built.
#[derive(Default)]
struct GateProbe(OnceLock<Weak<Disk>>);

impl GateProbe {
    fn paused(&self) -> bool {
        self.0
            .get()
            .and_then(Weak::upgrade)
            .is_some_and(|d| d.gate().is_paused())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Write { paused: bool },
    Flush { paused: bool },
}

type Action = Box<dyn FnOnce() + Send>;

/// What the slow target saw: every write and flush (whether the disk's gate
/// was paused when it started), and an action to run at the start of the
/// next flush.
#[derive(Default)]
struct TargetLog {
    gate: GateProbe,
    log: Mutex<Vec<Ev>>,
    on_flush: Mutex<Option<Action>>,
}

impl TargetLog {
    fn events(&self) -> Vec<Ev> {
        self.log.lock().unwrap().clone()
    }
}

/// A raw target whose flush sleeps and whose writes may be slowed, logging
/// into `log`.
fn slow_target(path: &Path, write_delay: Duration, log: Arc<TargetLog>) -> Result<Flaky> {
    Flaky::with_hook(path, move |op, _| {
        let paused = log.gate.paused();
        if op.writes() {
            log.log.lock().unwrap().push(Ev::Write { paused });
            std::thread::sleep(write_delay);
        } else if op == Op::Flush {
            log.log.lock().unwrap().push(Ev::Flush { paused });
            let action = log.on_flush.lock().unwrap().take();
            if let Some(f) = action {
                f();
            }
            std::thread::sleep(FLUSH_DELAY);
        }
    })
}

/// A sidecar file that logs (operation, bytes written, paused).
struct SidecarProbe {
    inner: FileStore,
    gate: GateProbe,
    log: Mutex<Vec<(&'static str, usize, bool)>>,
}

impl SidecarProbe {
    fn new(path: &Path) -> SidecarProbe {
        SidecarProbe {
            inner: FileStore::new(path),
            gate: GateProbe::default(),
            log: Mutex::new(Vec::new()),
        }
    }

    fn record(&self, op: &'static str, bytes: usize) {
        let paused = self.gate.paused();
        self.log.lock().unwrap().push((op, bytes, paused));
    }

    fn ops(&self) -> Vec<(&'static str, usize, bool)> {
        self.log.lock().unwrap().clone()
    }
}

impl MetaStore for SidecarProbe {
    fn size(&self) -> io::Result<Option<u64>> {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.record("write", buf.len());
        self.inner.write_at(offset, buf)
    }
    fn sync(&self) -> io::Result<()> {
        self.record("sync", 0);
        self.inner.sync()
    }
    fn replace(&self, contents: &[u8]) -> io::Result<()> {
        self.record("replace", contents.len());
        self.inner.replace(contents)
    }
    fn remove(&self) -> io::Result<()> {
        self.record("remove", 0);
        self.inner.remove()
    }
    fn stage(&self, contents: &[u8]) -> io::Result<()> {
        self.record("stage", contents.len());
        self.inner.stage(contents)
    }
    fn commit_staged(&self, contents: &[u8], changed: &[Range<usize>]) -> io::Result<()> {
        self.record("commit", changed.iter().map(|r| r.len()).sum());
        self.inner.commit_staged(contents, changed)
    }
    fn discard_staged(&self) {
        self.inner.discard_staged()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

struct Case {
    _dir: Scratch,
    rig: Rig,
    src: std::path::PathBuf,
    tgt: std::path::PathBuf,
    target: Arc<Flaky>,
    target_log: Arc<TargetLog>,
    sidecar: Arc<SidecarProbe>,
    _tracker: Arc<DirtyTracker>,
}

/// A `size` disk with a persistent 4 KiB-granularity bitmap, wired to move
/// its sidecar at the pivot as the daemon does, and a slow target.
fn setup(tag: &str, size: u64, write_delay: Duration) -> Result<Case> {
    let dir = Scratch::new(tag);
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    make_image(&src, size, 2)?;
    std::fs::File::create(&tgt)?.set_len(size)?;
    let disk = open_disk(&src)?;
    let mut cfg = TrackerConfig::new(size);
    cfg.sidecar = Some(Arc::new(FileStore::new(sidecar_path(&src))));
    cfg.flush_interval = Duration::from_secs(3600);
    let tracker = Arc::new(DirtyTracker::open(cfg)?);
    tracker.add("b0", Some(4096), true, false)?;
    disk.add_hook(tracker.clone());
    let rig = Rig::with_disk(disk.clone(), &src)?;
    let target_log = Arc::new(TargetLog::default());
    let _ = target_log.gate.0.set(Arc::downgrade(&disk));
    let target = Arc::new(slow_target(&tgt, write_delay, target_log.clone())?);
    let sidecar = Arc::new(SidecarProbe::new(&sidecar_path(&tgt)));
    let _ = sidecar.gate.0.set(Arc::downgrade(&disk));
    let (t, store) = (tracker.clone(), sidecar.clone());
    rig.manager.on_pivot(move |_old, _new| {
        let prepared = t
            .prepare_relocation(store.clone())
            .map_err(|e| e.to_string())?;
        let t = t.clone();
        Ok(Box::new(move || {
            t.relocate_prepared(prepared).map_err(|e| e.to_string())
        }))
    });
    Ok(Case {
        _dir: dir,
        rig,
        src,
        tgt,
        target,
        target_log,
        sidecar,
        _tracker: tracker,
    })
}

/// Mirrors to the slow target until READY, runs `arm`, completes, and
/// returns the job's stats once it has concluded.
fn mirror_and_complete(
    c: &Case,
    arm: impl FnOnce(),
) -> Result<vubd_backend::mirror::job::MirrorStats> {
    let mut req = MirrorRequest::new("disk0", &c.tgt, "full");
    req.job_id = Some("m".into());
    req.mode = TargetMode::Existing;
    req.auto_dismiss = false;
    let target: Arc<dyn Image> = c.target.clone();
    let job = c
        .rig
        .manager
        .start_to(req, target)
        .map_err(|e| anyhow::anyhow!(e.desc))?;
    wait_status(&job, JobStatus::Ready, T)?;
    arm();
    c.rig
        .qmp("job-complete", json!({"id": "m"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Concluded, T)?;
    let info = c.rig.block_job();
    ensure!(
        c.rig.disk.image().path() == c.tgt,
        "no pivot: {info:?} {:?}",
        c.rig.event_names()
    );
    let driver = MirrorManager::mirror_driver(&job).expect("a mirror job");
    Ok(driver.stats())
}

fn guest_write(disk: &Disk, offset: u64, len: usize, byte: u8) {
    let _batch = disk.gate().enter();
    let mut buf = vec![byte; len];
    disk.write(offset, &[IoBuf::from_slice(&mut buf)])
        .expect("guest write");
}

#[test]
fn pivot_pause_excludes_target_flush_and_sidecar_rewrite() -> Result<()> {
    let c = setup("quiet", 64 * MIB, Duration::ZERO)?;
    let stats = mirror_and_complete(&c, || {})?;
    let events = c.target_log.events();
    let flushes_in = events
        .iter()
        .filter(|e| **e == Ev::Flush { paused: true })
        .count();
    let flushes_out = events
        .iter()
        .filter(|e| **e == Ev::Flush { paused: false })
        .count();
    eprintln!(
        "pause {:?}, {} bytes copied under it; target flushes: {flushes_out} outside, {flushes_in} inside",
        stats.pivot_pause, stats.pivot_bytes
    );
    assert_eq!(
        flushes_in, 0,
        "nothing was copied under the pause, yet the slow target was flushed in it"
    );
    assert!(flushes_out >= 1, "the target was never flushed");
    let ops = c.sidecar.ops();
    eprintln!("sidecar operations (op, bytes, paused): {ops:?}");
    let full = ops
        .iter()
        .find(|(op, _, _)| *op == "stage" || *op == "replace")
        .copied();
    let Some((op, file_len, paused)) = full else {
        panic!("the new sidecar was never written: {ops:?}");
    };
    assert!(
        !paused,
        "the new sidecar was written in full ({op}, {file_len} bytes) inside the pause"
    );
    let in_pause: usize = ops.iter().filter(|o| o.2).map(|o| o.1).sum();
    assert!(
        in_pause < file_len,
        "{in_pause} of the sidecar's {file_len} bytes were written inside the pause"
    );
    ensure!(
        sidecar_path(&c.tgt).exists(),
        "no sidecar beside the target"
    );
    ensure!(
        !Path::new(&format!("{}.tmp", sidecar_path(&c.tgt).display())).exists(),
        "a staged sidecar was left behind"
    );
    Ok(())
}

#[test]
fn chunks_copied_under_the_pause_are_flushed_under_it() -> Result<()> {
    let c = setup("copied", 16 * MIB, Duration::ZERO)?;
    let disk = c.rig.disk.clone();
    let target = c.target_log.clone();
    let stats = mirror_and_complete(&c, || {
        // The guest writes while the target is flushed before the pause:
        // the pause finds those chunks dirty and copies them.
        *target.on_flush.lock().unwrap() = Some(Box::new(move || {
            guest_write(&disk, 3 * MIB, 64 * 1024, 0xa5);
        }));
    })?;
    ensure!(
        stats.pivot_bytes > 0,
        "nothing was dirty at the pause: {stats:?}"
    );
    let events = c.target_log.events();
    let last_write_in = events
        .iter()
        .rposition(|e| *e == Ev::Write { paused: true });
    let Some(w) = last_write_in else {
        panic!("no copy under the pause: {events:?}");
    };
    assert!(
        events[w..].contains(&Ev::Flush { paused: true }),
        "data copied under the pause was not flushed before I/O resumed: {events:?}"
    );
    let (s, t) = (std::fs::read(&c.src)?, std::fs::read(&c.tgt)?);
    ensure!(s == t, "target differs from source");
    Ok(())
}

#[test]
fn a_pause_that_finds_too_much_dirty_is_given_up_and_retried() -> Result<()> {
    // Slow target writes bound the measured copy rate, hence the amount the
    // pivot accepts to copy while paused (a few MiB at most here).
    let c = setup("bound", 16 * MIB, Duration::from_millis(10))?;
    let disk = c.rig.disk.clone();
    let target = c.target_log.clone();
    let burst = 8 * MIB;
    let stats = mirror_and_complete(&c, || {
        // A burst of guest writes right before the first pause.
        *target.on_flush.lock().unwrap() = Some(Box::new(move || {
            for i in 0..burst / MIB {
                guest_write(&disk, i * MIB, MIB as usize, 0x5a);
            }
        }));
    })?;
    eprintln!(
        "attempts {}, {} bytes copied under a {:?} pause",
        stats.pivot_attempts, stats.pivot_bytes, stats.pivot_pause
    );
    assert!(
        stats.pivot_bytes < burst,
        "the guest stayed paused while the whole burst ({} bytes) was copied",
        stats.pivot_bytes
    );
    assert!(stats.pivot_attempts >= 2, "{stats:?}");
    let (s, t) = (std::fs::read(&c.src)?, std::fs::read(&c.tgt)?);
    ensure!(s == t, "target differs from source");
    Ok(())
}

//! [`DirtyTracker::relocate`]: the mirror's pivot moves the persistent
//! bitmaps to the new image's sidecar. Bitmaps belong to the disk, so the
//! new sidecar must be complete on its own the moment relocate returns
//! (a crash right after the pivot restarts vubd with `--image NEW`), every
//! later mark must reach the new file's log, the old sidecar must stay as it
//! was (consistent with the old image, frozen at the pivot), and a relocation
//! that cannot write the new file must leave the tracker on the old one.
//!
//! A "crash" here is dropping the tracker without `shutdown` (what kill -9
//! leaves: the background write-out stops, nothing more is written). The
//! randomized power-loss run with a relocation in the middle is in
//! `dirty_powerloss.rs` (`power_loss_across_relocation_*`).

use anyhow::{ensure, Context, Result};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vubd_backend::dirty::{
    recover, sidecar_path, DirtyError, DirtyTracker, FileStore, MemStore, MetaStore, Recovery,
    TrackerConfig,
};

const MIB: u64 = 1 << 20;
const DISK: u64 = 64 * MIB + 512;
/// Activity-log extent of these tests: marks in distinct 1 MiB extents are
/// told apart after a crash.
const EXTENT: u64 = MIB;

/// A sidecar in memory that counts what is done to it and can be made to
/// fail every operation that writes.
#[derive(Default)]
struct Probe {
    mem: MemStore,
    fail: AtomicBool,
    /// Successful write_at, sync, replace and remove calls.
    mutations: AtomicU64,
}

impl Probe {
    fn failing() -> Self {
        let p = Probe::default();
        p.fail.store(true, Ordering::SeqCst);
        p
    }

    fn mutations(&self) -> u64 {
        self.mutations.load(Ordering::SeqCst)
    }

    fn contents(&self) -> Option<Vec<u8>> {
        self.mem.contents()
    }

    fn gate(&self) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected: device full"));
        }
        self.mutations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl MetaStore for Probe {
    fn size(&self) -> io::Result<Option<u64>> {
        self.mem.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.mem.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.gate()?;
        self.mem.write_at(offset, buf)
    }
    fn sync(&self) -> io::Result<()> {
        self.gate()?;
        self.mem.sync()
    }
    fn replace(&self, contents: &[u8]) -> io::Result<()> {
        self.gate()?;
        self.mem.replace(contents)
    }
    fn remove(&self) -> io::Result<()> {
        self.gate()?;
        self.mem.remove()
    }
    fn describe(&self) -> String {
        "probe".into()
    }
}

fn config(store: Option<Arc<dyn MetaStore>>) -> TrackerConfig {
    let mut cfg = TrackerConfig::new(DISK);
    cfg.sidecar = store;
    cfg.extent_size = EXTENT;
    // No timed write-out unless a test asks: what reaches the files is
    // then exactly what the operations under test wrote.
    cfg.flush_interval = Duration::from_secs(3600);
    cfg
}

fn open(store: &Arc<Probe>) -> Result<DirtyTracker> {
    let store: Arc<dyn MetaStore> = store.clone();
    DirtyTracker::open(config(Some(store))).context("open the tracker")
}

fn recover_bytes(bytes: Option<Vec<u8>>) -> Result<Recovery> {
    let mem = MemStore::new();
    mem.set_contents(bytes);
    recover(&mem, DISK).context("recover")
}

/// The persistent bitmaps every test starts with: two recording ones of
/// different granularities, a disabled one, and an in-memory one.
fn add_bitmaps(t: &DirtyTracker) -> Result<()> {
    t.add("p", Some(65536), true, false)?;
    t.add("fine", Some(512), true, false)?;
    t.add("off", Some(65536), true, true)?;
    t.add("vol", Some(65536), false, false)?;
    Ok(())
}

/// Marks `(offset, len)` ranges.
fn mark_all(t: &DirtyTracker, ranges: &[(u64, u64)]) -> Result<()> {
    for &(off, len) in ranges {
        t.mark(off, len)
            .with_context(|| format!("mark {off}+{len}"))?;
    }
    Ok(())
}

/// Every chunk of every range is set in the recovered bitmap `name`.
fn assert_has(rec: &Recovery, name: &str, ranges: &[(u64, u64)], what: &str) -> Result<()> {
    let b = rec
        .bitmaps
        .iter()
        .find(|b| b.name == name)
        .with_context(|| format!("{what}: bitmap '{name}' missing"))?;
    ensure!(!b.inconsistent, "{what}: '{name}' inconsistent");
    for &(off, len) in ranges {
        let mut o = off;
        while o < off + len {
            ensure!(
                b.bitmap.get(o),
                "{what}: '{name}' lost the mark at {o} (of {off}+{len})"
            );
            o += 512;
        }
        ensure!(
            b.bitmap.get(off + len - 1),
            "{what}: '{name}' lost {off}+{len}"
        );
    }
    Ok(())
}

/// No chunk of any range is set in the recovered bitmap `name`.
fn assert_lacks(rec: &Recovery, name: &str, ranges: &[(u64, u64)], what: &str) -> Result<()> {
    let b = rec
        .bitmaps
        .iter()
        .find(|b| b.name == name)
        .with_context(|| format!("{what}: bitmap '{name}' missing"))?;
    for &(off, len) in ranges {
        ensure!(
            !b.bitmap.get(off) && !b.bitmap.get(off + len - 1),
            "{what}: '{name}' has {off}+{len}, marked after the relocation"
        );
    }
    Ok(())
}

/// Recovered bits equal the tracker's (a clean file: no log applied).
fn assert_exact(rec: &Recovery, t: &DirtyTracker, what: &str) -> Result<()> {
    let names: Vec<String> = t
        .list()
        .into_iter()
        .filter(|b| b.persistent)
        .map(|b| b.name)
        .collect();
    ensure!(
        rec.bitmaps.len() == names.len(),
        "{what}: {} bitmaps in the file, {} persistent in the tracker",
        rec.bitmaps.len(),
        names.len()
    );
    for name in names {
        let b = rec
            .bitmaps
            .iter()
            .find(|b| b.name == name)
            .with_context(|| format!("{what}: '{name}' missing"))?;
        ensure!(
            b.bitmap.sha256_hex() == t.sha256(&name)?,
            "{what}: '{name}' differs from the tracker's bits"
        );
        let live = t.list().into_iter().find(|x| x.name == name);
        ensure!(
            live.is_some_and(|l| l.recording == b.recording),
            "{what}: '{name}' recording state differs"
        );
    }
    Ok(())
}

/// Marks before the relocation (some in the fine level, some only in the old
/// file's activity log) are in the new sidecar as soon as relocate returns;
/// the disabled bitmap stays disabled and the in-memory one stays out.
#[test]
fn marks_before_relocate_are_in_the_new_sidecar() -> Result<()> {
    let old = Arc::new(Probe::default());
    let t = open(&old)?;
    add_bitmaps(&t)?;
    let early = [(5 * MIB + 7, 100), (DISK - 512, 512)];
    mark_all(&t, &early)?;
    t.checkpoint_now()?;
    let late = [(20 * MIB, 3 * 4096), (33 * MIB - 512, 1024)];
    mark_all(&t, &late)?;
    let new = Arc::new(Probe::default());
    t.relocate(new.clone())?;

    // A crash right now: recovery from the new file alone.
    let rec = recover_bytes(new.contents())?;
    let mut names: Vec<&str> = rec.bitmaps.iter().map(|b| b.name.as_str()).collect();
    names.sort_unstable();
    ensure!(
        names == ["fine", "off", "p"],
        "bitmaps in the new file: {names:?}"
    );
    for name in ["p", "fine"] {
        assert_has(&rec, name, &early, "new file")?;
        assert_has(&rec, name, &late, "new file")?;
    }
    let off = rec
        .bitmaps
        .iter()
        .find(|b| b.name == "off")
        .context("off")?;
    ensure!(
        !off.recording && off.bitmap.dirty_chunks() == 0,
        "'off' changed"
    );
    // Over-marking after the relocation is bounded by the extents written.
    let p = rec.bitmaps.iter().find(|b| b.name == "p").context("p")?;
    let marked_extents = [5, 20, 32, 64].len() as u64;
    ensure!(
        p.bitmap.dirty_chunks() <= marked_extents * (EXTENT / 65536),
        "'p' over-marked: {} chunks",
        p.bitmap.dirty_chunks()
    );

    // Clean stop on the new file: exactly the tracker's bits.
    t.shutdown()?;
    let rec = recover_bytes(new.contents())?;
    ensure!(rec.clean, "shutdown did not close the new file cleanly");
    assert_exact(&rec, &t, "new file after shutdown")?;
    Ok(())
}

/// After the relocation, marks go to the new file's log (and survive a
/// crash), checkpoints, clears and new bitmaps go to the new file, and the
/// old file is not touched at all; it still recovers every mark made before.
#[test]
fn marks_after_relocate_reach_the_new_log_and_leave_the_old_file_alone() -> Result<()> {
    let old = Arc::new(Probe::default());
    let t = open(&old)?;
    add_bitmaps(&t)?;
    let before = [(3 * MIB, 4096), (40 * MIB + 512, 512)];
    mark_all(&t, &before)?;
    let new = Arc::new(Probe::default());
    t.relocate(new.clone())?;
    let old_bytes = old.contents();
    let old_mutations = old.mutations();

    // Extents not touched before: each needs a commit to the new log.
    let commits = t.stats().log_commits;
    let new_mutations = new.mutations();
    let after = [(10 * MIB, 4096), (50 * MIB + 4096, 8192)];
    mark_all(&t, &after)?;
    ensure!(
        t.stats().log_commits >= commits + 2,
        "marks in cold extents were not committed to a log"
    );
    ensure!(
        new.mutations() > new_mutations,
        "the log commits did not write the new file"
    );
    // A crash now: the new file's log holds them (no checkpoint since).
    let rec = recover_bytes(new.contents())?;
    ensure!(
        !rec.clean && rec.log_extents >= 2,
        "marks not in the new log"
    );
    for name in ["p", "fine"] {
        assert_has(&rec, name, &before, "new file, crash")?;
        assert_has(&rec, name, &after, "new file, crash")?;
    }

    // Management goes to the new file too.
    t.checkpoint_now()?;
    t.clear("fine")?;
    let after_clear = [(60 * MIB, 512)];
    mark_all(&t, &after_clear)?;
    t.add("later", None, true, false)?;
    t.mark(61 * MIB, 512)?;
    t.enable("off")?;
    t.mark(62 * MIB, 512)?;
    drop(t); // kill -9

    ensure!(
        old.mutations() == old_mutations && old.contents() == old_bytes,
        "the old sidecar changed after the relocation"
    );
    let rec = recover_bytes(old.contents())?;
    for name in ["p", "fine"] {
        assert_has(&rec, name, &before, "old file")?;
        assert_lacks(&rec, name, &after, "old file")?;
    }
    ensure!(
        rec.bitmaps.iter().all(|b| b.name != "later"),
        "a bitmap added after the relocation reached the old file"
    );

    // The restart on the new image: `open` from the new sidecar.
    let new_store: Arc<dyn MetaStore> = new.clone();
    let t = DirtyTracker::open(config(Some(new_store)))?;
    ensure!(!t.stats().recovered_clean, "the crash was not noticed");
    let rec = recover_bytes(new.contents())?;
    assert_has(&rec, "p", &before, "restart")?;
    assert_has(&rec, "p", &after, "restart")?;
    assert_has(&rec, "fine", &after_clear, "restart")?;
    assert_lacks(&rec, "fine", &before, "restart (cleared)")?;
    assert_has(&rec, "later", &[(61 * MIB, 512)], "restart")?;
    assert_has(&rec, "off", &[(62 * MIB, 512)], "restart")?;
    let listed: Vec<String> = t.list().into_iter().map(|b| b.name).collect();
    ensure!(listed.len() == 4, "after the restart: {listed:?}");
    Ok(())
}

/// A relocation whose new file cannot be written fails, and the tracker
/// keeps working on the old file: marks, their log commits, checkpoints,
/// and a later relocation to a working store.
#[test]
fn failed_relocate_keeps_the_old_sidecar() -> Result<()> {
    let old = Arc::new(Probe::default());
    let t = open(&old)?;
    add_bitmaps(&t)?;
    let before = [(7 * MIB, 4096)];
    mark_all(&t, &before)?;

    let broken = Arc::new(Probe::failing());
    let err = t
        .relocate(broken.clone())
        .err()
        .context("relocation to a store that fails every write succeeded")?;
    ensure!(
        matches!(err, DirtyError::Io { .. }),
        "unexpected error: {err}"
    );
    ensure!(broken.contents().is_none(), "the broken store holds a file");

    let old_mutations = old.mutations();
    let after = [(30 * MIB, 4096), (45 * MIB, 512)];
    mark_all(&t, &after)?;
    ensure!(
        old.mutations() > old_mutations,
        "marks after the failed relocation did not reach the old log"
    );
    // A crash now: everything is in the old file.
    let rec = recover_bytes(old.contents())?;
    for name in ["p", "fine"] {
        assert_has(&rec, name, &before, "old file")?;
        assert_has(&rec, name, &after, "old file")?;
    }
    // The failed attempt consumed the changed-page marks: the write-outs
    // after it must still write every page. After two checkpoints the
    // extent of `before` is out of the log, so only the fine level has it.
    t.checkpoint_now()?;
    t.checkpoint_now()?;
    let rec = recover_bytes(old.contents())?;
    assert_has(&rec, "fine", &before, "old file after checkpoints")?;
    assert_has(&rec, "p", &before, "old file after checkpoints")?;

    // The pivot may be retried.
    let good = Arc::new(Probe::default());
    t.relocate(good.clone())?;
    t.shutdown()?;
    let rec = recover_bytes(good.contents())?;
    ensure!(rec.clean, "not closed cleanly");
    assert_exact(&rec, &t, "new file after the retried relocation")?;
    Ok(())
}

/// Without persistent bitmaps (or without any sidecar), relocate records the
/// store: a later persistent `add` writes there, the background write-out
/// runs for it, and a stale sidecar at the new place is removed rather than
/// left to claim bitmaps for the new image.
#[test]
fn relocate_without_persistent_bitmaps_records_the_store() -> Result<()> {
    // No sidecar configured at all.
    let t = DirtyTracker::open(config(None))?;
    t.add("vol", None, false, false)?;
    ensure!(
        matches!(
            t.add("early", None, true, false),
            Err(DirtyError::PersistenceUnavailable(_))
        ),
        "persistent add without a sidecar"
    );
    let new = Arc::new(Probe::default());
    t.relocate(new.clone())?;
    ensure!(new.contents().is_none(), "an empty sidecar was written");
    t.add("p", None, true, false)?;
    t.mark(9 * MIB, 4096)?;
    let checkpoints = t.stats().checkpoints;
    t.set_flush_interval(Duration::from_millis(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.stats().checkpoints == checkpoints {
        ensure!(
            Instant::now() < deadline,
            "no background write-out after the relocation"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(t);
    let rec = recover_bytes(new.contents())?;
    ensure!(rec.bitmaps.len() == 1, "expected only 'p' in the new file");
    assert_has(&rec, "p", &[(9 * MIB, 4096)], "new file")?;

    // A sidecar with no persistent bitmap in it, and a stale file where the
    // new one goes.
    let old = Arc::new(Probe::default());
    let t = open(&old)?;
    t.add("vol", None, false, false)?;
    let stale = Arc::new(Probe::default());
    {
        let other = open(&stale)?;
        other.add("stale", None, true, false)?;
        other.mark(0, 4096)?;
        other.shutdown()?;
    }
    ensure!(stale.contents().is_some(), "setup: no stale sidecar");
    t.relocate(stale.clone())?;
    ensure!(
        stale.contents().is_none(),
        "a stale sidecar was left beside the new image"
    );
    t.add("p", None, true, false)?;
    ensure!(old.contents().is_none(), "the old place got a sidecar");
    t.shutdown()?;
    let rec = recover_bytes(stale.contents())?;
    let names: Vec<&str> = rec.bitmaps.iter().map(|b| b.name.as_str()).collect();
    ensure!(names == ["p"], "new file holds {names:?}");
    Ok(())
}

/// A stale sidecar where the new one goes is replaced by the disk's bitmaps.
#[test]
fn relocate_replaces_a_stale_sidecar() -> Result<()> {
    let stale = Arc::new(Probe::default());
    {
        let other = open(&stale)?;
        other.add("p", Some(65536), true, false)?;
        other.add("stale", None, true, false)?;
        other.mark(12 * MIB, 4096)?;
    }
    let old = Arc::new(Probe::default());
    let t = open(&old)?;
    t.add("p", Some(65536), true, false)?;
    t.mark(MIB, 4096)?;
    t.relocate(stale.clone())?;
    t.shutdown()?;
    let rec = recover_bytes(stale.contents())?;
    assert_exact(&rec, &t, "replaced sidecar")?;
    assert_lacks(&rec, "p", &[(12 * MIB, 4096)], "replaced sidecar")?;
    Ok(())
}

/// The real files: vubd started on `old.img`, the pivot to `new.img`, kill
/// -9 right after some more writes, and a restart with `--image new.img`
/// finds every bitmap complete (`TrackerConfig::for_image`).
#[test]
fn restart_on_the_new_image_finds_the_bitmaps() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("vubd-dirty-relocate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let old_img = dir.join("old.img");
    let new_img = dir.join("new.img");
    let for_image = |img: &std::path::Path| {
        let mut cfg = TrackerConfig::for_image(img, DISK);
        cfg.extent_size = EXTENT;
        cfg.flush_interval = Duration::from_secs(3600);
        cfg
    };
    let t = DirtyTracker::open(for_image(&old_img))?;
    add_bitmaps(&t)?;
    let before = [(2 * MIB, 4096), (DISK - 512, 512)];
    mark_all(&t, &before)?;
    t.relocate(Arc::new(FileStore::new(sidecar_path(&new_img))))?;
    let after = [(22 * MIB, 65536)];
    mark_all(&t, &after)?;
    let old_bytes = std::fs::read(sidecar_path(&old_img))?;
    t.checkpoint_now()?;
    let after2 = [(44 * MIB, 512)];
    mark_all(&t, &after2)?;
    drop(t); // kill -9

    ensure!(
        std::fs::read(sidecar_path(&old_img))? == old_bytes,
        "the old sidecar changed after the pivot"
    );
    let mut tmp = sidecar_path(&new_img).into_os_string();
    tmp.push(".tmp");
    ensure!(
        !std::path::Path::new(&tmp).exists(),
        "temporary file left behind"
    );
    let t = DirtyTracker::open(for_image(&new_img))?;
    let listed = t.list();
    ensure!(
        listed.iter().filter(|b| b.persistent).count() == 3
            && listed.iter().all(|b| !b.inconsistent),
        "bitmaps after the restart: {listed:?}"
    );
    for name in ["p", "fine"] {
        let b = t.bitmap(name)?;
        for &(off, len) in before.iter().chain(&after).chain(&after2) {
            ensure!(
                b.get(off) && b.get(off + len - 1),
                "'{name}' lost {off}+{len} across the pivot and the crash"
            );
        }
    }
    ensure!(!t.bitmap("off")?.get(2 * MIB), "'off' recorded");
    t.shutdown()?;
    // The old image's sidecar still opens and holds the marks made on it.
    let rec = recover(&FileStore::new(sidecar_path(&old_img)), DISK)?;
    assert_has(&rec, "p", &before, "old sidecar")?;
    assert_lacks(&rec, "p", &after2, "old sidecar")?;
    Ok(())
}

/// A read-only disk's bitmaps follow it too: the new sidecar is written once
/// (exact: no log to apply), the old one never.
#[test]
fn read_only_disk_bitmaps_are_copied() -> Result<()> {
    let old = Arc::new(Probe::default());
    {
        let t = open(&old)?;
        add_bitmaps(&t)?;
        mark_all(&t, &[(MIB, 4096), (63 * MIB, 512)])?;
        t.shutdown()?;
    }
    let old_mutations = old.mutations();
    let store: Arc<dyn MetaStore> = old.clone();
    let mut cfg = config(Some(store));
    cfg.read_only = true;
    let t = DirtyTracker::open(cfg)?;
    let new = Arc::new(Probe::default());
    t.relocate(new.clone())?;
    t.shutdown()?;
    ensure!(
        old.mutations() == old_mutations,
        "read-only: old file written"
    );
    let rec = recover_bytes(new.contents())?;
    ensure!(rec.log_extents == 0, "read-only copy applies a log");
    assert_exact(&rec, &t, "read-only copy")?;
    Ok(())
}

#[test]
fn relocate_after_shutdown_is_refused() -> Result<()> {
    let old = Arc::new(Probe::default());
    let t = open(&old)?;
    t.add("p", None, true, false)?;
    t.shutdown()?;
    let new = Arc::new(Probe::default());
    ensure!(
        matches!(t.relocate(new.clone()), Err(DirtyError::ShutDown)),
        "relocate after shutdown"
    );
    ensure!(new.contents().is_none(), "written after shutdown");
    Ok(())
}

/// Relocations while the background write-out runs every millisecond and
/// management calls (checkpoints, clears, enable/disable, add/remove) run on
/// another thread: no deadlock, and every relocation leaves a complete file.
/// Marks run between relocations only (the precondition), as the pivot
/// pauses guest I/O.
#[test]
fn relocate_races_management_and_background_write_out() -> Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(race());
    });
    rx.recv_timeout(Duration::from_secs(120))
        .context("deadlock: relocations did not finish in 120 s")?
}

fn race() -> Result<()> {
    let first = Arc::new(Probe::default());
    let first_store: Arc<dyn MetaStore> = first.clone();
    let mut cfg = config(Some(first_store));
    cfg.flush_interval = Duration::from_millis(1);
    let t = Arc::new(DirtyTracker::open(cfg)?);
    add_bitmaps(&t)?;
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mgmt = {
        let (t, stop, calls) = (t.clone(), stop.clone(), calls.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = t.checkpoint_now();
                let _ = if i.is_multiple_of(2) {
                    t.disable("off")
                } else {
                    t.enable("off")
                };
                if i.is_multiple_of(5) {
                    let _ = t.add("tmp", None, true, false);
                    let _ = t.remove("tmp");
                }
                if i.is_multiple_of(7) {
                    let _ = t.merge("p", &["vol"]);
                }
                i += 1;
                calls.store(i, Ordering::Relaxed);
            }
        })
    };
    let mut marked = Vec::new();
    let start = Instant::now();
    let mut round = 0u64;
    while round < 200 || start.elapsed() < Duration::from_millis(500) {
        round += 1;
        let off = (round * 7 * MIB / 3 + round * 4096) % (DISK - 4096);
        t.mark(off, 4096)?;
        marked.push((off, 4096));
        let store = Arc::new(Probe::default());
        t.relocate(store.clone())
            .with_context(|| format!("relocation {round}"))?;
        let rec = recover_bytes(store.contents())?;
        assert_has(&rec, "p", &marked, "after a racing relocation")?;
        if marked.len() > 64 {
            marked.remove(0);
        }
    }
    stop.store(true, Ordering::Relaxed);
    mgmt.join()
        .map_err(|_| anyhow::anyhow!("management thread panicked"))?;
    let calls = calls.load(Ordering::Relaxed);
    ensure!(calls > 10, "management ran only {calls} rounds: no race");
    println!("{round} relocations raced {calls} rounds of management calls");
    Ok(())
}

/// The pivot's two-phase relocation: the new sidecar is staged (written and
/// synced under a temporary name) while marks go on, a checkpoint of the old
/// file runs in between, and the commit under the pause must still give a
/// new file that holds every mark, those after the staging included; a
/// relocation given up leaves no file behind.
#[test]
fn prepared_relocation_holds_marks_made_after_staging() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("vubd-dirty-prepared-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let (old_img, new_img) = (dir.join("old.img"), dir.join("new.img"));
    let for_image = |img: &std::path::Path| {
        let mut cfg = TrackerConfig::for_image(img, DISK);
        cfg.extent_size = EXTENT;
        cfg.flush_interval = Duration::from_secs(3600);
        cfg
    };
    let tmp = {
        let mut t = sidecar_path(&new_img).into_os_string();
        t.push(".tmp");
        std::path::PathBuf::from(t)
    };
    let t = DirtyTracker::open(for_image(&old_img))?;
    add_bitmaps(&t)?;
    let before = [(2 * MIB, 4096), (DISK - 512, 512)];
    mark_all(&t, &before)?;

    // Given up: nothing left behind, the old file still in use.
    let given_up = t.prepare_relocation(Arc::new(FileStore::new(sidecar_path(&new_img))))?;
    ensure!(tmp.exists(), "nothing staged");
    drop(given_up);
    ensure!(!tmp.exists(), "a given-up relocation left its staged file");
    ensure!(!sidecar_path(&new_img).exists(), "a sidecar appeared");

    let prepared = t.prepare_relocation(Arc::new(FileStore::new(sidecar_path(&new_img))))?;
    ensure!(
        !sidecar_path(&new_img).exists(),
        "staging put the new sidecar in place"
    );
    // Marks after the staging, in new extents and old ones, around a
    // checkpoint of the old file (a new log epoch).
    let between = [(9 * MIB, 4096), (2 * MIB + 8192, 512)];
    mark_all(&t, &between)?;
    t.checkpoint_now()?;
    let between2 = [(30 * MIB + 512, 1024)];
    mark_all(&t, &between2)?;
    t.relocate_prepared(prepared)?;
    let after = [(50 * MIB, 65536)];
    mark_all(&t, &after)?;
    drop(t); // kill -9

    ensure!(!tmp.exists(), "temporary file left behind");
    let t = DirtyTracker::open(for_image(&new_img))?;
    for name in ["p", "fine"] {
        let b = t.bitmap(name)?;
        for &(off, len) in before.iter().chain(&between).chain(&between2).chain(&after) {
            ensure!(
                b.get(off) && b.get(off + len - 1),
                "'{name}' lost {off}+{len} across the prepared relocation and the crash"
            );
        }
    }
    ensure!(!t.bitmap("off")?.get(2 * MIB), "'off' recorded");
    t.shutdown()?;
    let rec = recover(&FileStore::new(sidecar_path(&old_img)), DISK)?;
    assert_has(&rec, "p", &between2, "old sidecar")?;
    assert_lacks(&rec, "p", &after, "old sidecar")?;
    Ok(())
}

/// Fails every directory sync of the store below while set.
static FAIL_DIR_SYNC: AtomicBool = AtomicBool::new(false);

fn flaky_dir_sync(dir: &std::path::Path) -> io::Result<()> {
    if FAIL_DIR_SYNC.load(Ordering::SeqCst) {
        return Err(io::Error::from_raw_os_error(5)); // EIO
    }
    std::fs::File::open(dir)?.sync_all()
}

/// A transaction (and a plain add) whose new sidecar was renamed into place
/// but whose directory sync failed is committed, not reverted: the tracker
/// then writes to the file at the path (not to the unlinked old one), so a
/// guest write after it is in the bitmaps after a kill -9 and a restart,
/// and the restart finds the state that was reported.
#[test]
fn failed_directory_sync_after_the_rename_commits() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("vubd-dirty-dirsync-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            FAIL_DIR_SYNC.store(false, Ordering::SeqCst);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let path = sidecar_path(&dir.join("disk.img"));
    let open_at = |flaky: bool| {
        let store = if flaky {
            FileStore::with_dir_sync(&path, flaky_dir_sync)
        } else {
            FileStore::new(&path)
        };
        let mut cfg = TrackerConfig::new(DISK);
        cfg.sidecar = Some(Arc::new(store));
        cfg.extent_size = EXTENT;
        cfg.flush_interval = Duration::from_secs(3600);
        DirtyTracker::open(cfg)
    };

    let t = open_at(true)?;
    t.add("b0", None, true, false)?;
    t.mark(0, 512)?;
    FAIL_DIR_SYNC.store(true, Ordering::SeqCst);
    let mut txn = t.transaction();
    txn.disable("b0")?;
    txn.add("b1", None, true, false)?;
    let answer = txn.commit();
    FAIL_DIR_SYNC.store(false, Ordering::SeqCst);
    ensure!(
        answer.is_ok(),
        "transaction reported failed although its sidecar is in place: {answer:?}"
    );
    t.mark(2 * MIB, 512)?;
    drop(t); // kill -9

    let t = open_at(true)?;
    let (b0, b1) = (t.bitmap("b0")?, t.bitmap("b1")?);
    ensure!(
        !b0.is_recording() && b1.is_recording(),
        "restart found another state than the transaction reported: {:?}",
        t.list()
    );
    ensure!(
        b0.get(0) && !b0.get(2 * MIB) && b1.get(2 * MIB),
        "a guest write after the transaction was lost: b0 {} {}, b1 {}",
        b0.get(0),
        b0.get(2 * MIB),
        b1.get(2 * MIB)
    );

    // A plain add, the same way.
    FAIL_DIR_SYNC.store(true, Ordering::SeqCst);
    let added = t.add("b2", None, true, false);
    FAIL_DIR_SYNC.store(false, Ordering::SeqCst);
    ensure!(
        added.is_ok(),
        "add reported failed although its sidecar is in place: {added:?}"
    );
    t.mark(4 * MIB, 512)?;
    drop(t); // kill -9

    let t = open_at(false)?;
    let (b1, b2) = (t.bitmap("b1")?, t.bitmap("b2")?);
    ensure!(
        b1.get(2 * MIB) && b1.get(4 * MIB) && b2.get(4 * MIB),
        "a guest write after the add was lost: b1 {} {}, b2 {}",
        b1.get(2 * MIB),
        b1.get(4 * MIB),
        b2.get(4 * MIB)
    );
    t.shutdown()?;
    Ok(())
}

//! Power-loss simulation for persistent dirty bitmaps.
//!
//! A [`MetaStore`] that remembers every write since the last sync stands in
//! for the sidecar file. At a random instant, while several threads mark
//! concurrently and the background write-out runs every few milliseconds,
//! the power is cut: the store keeps what was synced plus a random subset of
//! the unsynced writes, cut into 512-byte sectors and applied in random order,
//! and every later operation fails. Recovery (exactly what vubd runs at
//! start) must then contain every chunk of every mark that returned `Ok`
//! (before the cut or after it, on the lock-free path); marks that failed or
//! never returned may go either way. Each trial has two lives: the survivor
//! of the first cut is opened again, marked again, and cut again, so the
//! open path's rewrite is checked too. Half the trials also inject random
//! I/O errors before the cut, to exercise failed and retried commits and
//! checkpoints.
//!
//! A second test moves the bitmaps to another sidecar in the middle of each
//! life ([`DirtyTracker::relocate`], the mirror's pivot): markers pause, the
//! tracker relocates, markers resume on the new file; the power cut hits
//! both files at the same instant (sometimes right after the relocation
//! returned). Recovery from the new file (or from the old one, if the
//! relocation failed) must hold every completed mark, and the old file must
//! not have been touched after the relocation and must still hold every mark
//! made before it.
//!
//! `DIRTY_POWERLOSS_TRIALS` sets the number of trials (default 2000),
//! `DIRTY_RELOCATE_TRIALS` those of the relocation test (default 500).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use vubd_backend::dirty::{recover, DirtyTracker, MemStore, MetaStore, TrackerConfig};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB + 4096 + 512;
const EXTENT: u64 = 64 * 1024;
/// (name, granularity): fine, default and coarse.
const BITMAPS: [(&str, u64); 3] = [("fine", 512), ("mid", 65536), ("coarse", 4 * MIB)];

/// SplitMix64: small, seedable, reproducible.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One file of the simulated machine.
#[derive(Default)]
struct SimFile {
    durable: Option<Vec<u8>>,
    volatile: Option<Vec<u8>>,
    pending: Vec<(u64, Vec<u8>)>,
    /// Successful writes, syncs, replacements and removals: the old sidecar
    /// of a relocation must see none after it.
    mutations: u64,
}

/// The machine: every file on it loses its unsynced writes at the same cut.
struct SimState {
    files: Vec<SimFile>,
    dead: bool,
    fail_percent: u64,
    rng: Rng,
    /// Cut the power when this many syncs have been requested (the cut then
    /// lands exactly between two steps of the protocol).
    cut_at_sync: Option<u64>,
    syncs: u64,
    survivors: Option<Vec<Option<Vec<u8>>>>,
}

/// A sidecar that loses unsynced writes at a power cut: file `file` of a
/// simulated machine shared with the other stores made from it.
struct SimStore {
    state: Arc<Mutex<SimState>>,
    file: usize,
}

fn apply(file: &mut Vec<u8>, off: u64, bytes: &[u8]) {
    let off = off as usize;
    if file.len() < off + bytes.len() {
        file.resize(off + bytes.len(), 0);
    }
    file[off..off + bytes.len()].copy_from_slice(bytes);
}

impl SimStore {
    /// A machine with one file (`initial`: its content, `None`: no file).
    fn new(initial: Option<Vec<u8>>, seed: u64) -> Self {
        SimStore {
            state: Arc::new(Mutex::new(SimState {
                files: Vec::new(),
                dead: false,
                fail_percent: 0,
                rng: Rng(seed),
                cut_at_sync: None,
                syncs: 0,
                survivors: None,
            })),
            file: 0,
        }
        .sibling(initial)
    }

    /// Another file on the same machine (same power, same injected errors).
    fn sibling(&self, initial: Option<Vec<u8>>) -> Self {
        let mut s = self.state.lock().unwrap();
        s.files.push(SimFile {
            durable: initial.clone(),
            volatile: initial,
            ..SimFile::default()
        });
        SimStore {
            state: self.state.clone(),
            file: s.files.len() - 1,
        }
    }

    fn mutations(&self) -> u64 {
        self.state.lock().unwrap().files[self.file].mutations
    }

    /// The durable content (what a crash without power loss would leave).
    fn durable(&self) -> Option<Vec<u8>> {
        self.state.lock().unwrap().files[self.file].durable.clone()
    }

    fn set_fail_percent(&self, p: u64) {
        self.state.lock().unwrap().fail_percent = p;
    }

    fn cut_at_sync(&self, n: u64) {
        self.state.lock().unwrap().cut_at_sync = Some(n);
    }

    fn is_dead(&self) -> bool {
        self.state.lock().unwrap().dead
    }

    /// Cuts the power (if not yet cut): returns what survives of this file
    /// on stable storage.
    fn cut(&self) -> Option<Vec<u8>> {
        let mut s = self.state.lock().unwrap();
        Self::cut_locked(&mut s)[self.file].clone()
    }

    fn cut_locked(s: &mut SimState) -> &[Option<Vec<u8>>] {
        if s.survivors.is_none() {
            s.dead = true;
            let mut rng = s.rng.clone();
            let survivors = s
                .files
                .iter()
                .map(|f| Self::survivor(f, &mut rng))
                .collect();
            s.survivors = Some(survivors);
        }
        s.survivors.as_deref().unwrap_or(&[])
    }

    fn survivor(f: &SimFile, rng: &mut Rng) -> Option<Vec<u8>> {
        let mut file = f.durable.clone()?;
        let mut sectors = Vec::new();
        for (off, bytes) in &f.pending {
            for (i, chunk) in bytes.chunks(512).enumerate() {
                sectors.push((off + i as u64 * 512, chunk.to_vec()));
            }
        }
        // A random subset, in random order.
        for i in (1..sectors.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            sectors.swap(i, j);
        }
        let keep_percent = rng.below(101);
        for (off, bytes) in sectors {
            if rng.chance(keep_percent) {
                apply(&mut file, off, &bytes);
            }
        }
        Some(file)
    }

    fn gate(s: &mut SimState) -> io::Result<()> {
        if s.dead {
            return Err(io::Error::other("power is off"));
        }
        let p = s.fail_percent;
        if p > 0 && s.rng.chance(p) {
            return Err(io::Error::other("injected I/O error"));
        }
        Ok(())
    }
}

impl MetaStore for SimStore {
    fn size(&self) -> io::Result<Option<u64>> {
        let s = self.state.lock().unwrap();
        if s.dead {
            return Err(io::Error::other("power is off"));
        }
        Ok(s.files[self.file].volatile.as_ref().map(|v| v.len() as u64))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let s = self.state.lock().unwrap();
        if s.dead {
            return Err(io::Error::other("power is off"));
        }
        let v = s.files[self.file]
            .volatile
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let start = (offset as usize).min(v.len());
        let n = buf.len().min(v.len() - start);
        buf[..n].copy_from_slice(&v[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        Self::gate(&mut s)?;
        let f = &mut s.files[self.file];
        let v = f
            .volatile
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        apply(v, offset, buf);
        f.pending.push((offset, buf.to_vec()));
        f.mutations += 1;
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.syncs += 1;
        if s.cut_at_sync.is_some_and(|n| s.syncs >= n) {
            Self::cut_locked(&mut s);
        }
        Self::gate(&mut s)?;
        let f = &mut s.files[self.file];
        let pending = std::mem::take(&mut f.pending);
        if let Some(d) = f.durable.as_mut() {
            for (off, bytes) in pending {
                apply(d, off, &bytes);
            }
        }
        f.mutations += 1;
        Ok(())
    }

    fn replace(&self, contents: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        Self::gate(&mut s)?;
        let f = &mut s.files[self.file];
        f.durable = Some(contents.to_vec());
        f.volatile = Some(contents.to_vec());
        f.pending.clear();
        f.mutations += 1;
        Ok(())
    }

    fn remove(&self) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        Self::gate(&mut s)?;
        let f = &mut s.files[self.file];
        f.durable = None;
        f.volatile = None;
        f.pending.clear();
        f.mutations += 1;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("power-loss simulation, file {}", self.file)
    }
}

/// What the markers did: ranges whose mark returned Ok, and every range
/// attempted (for the over-marking figure).
#[derive(Default)]
struct Record {
    /// (sequence number at start, offset, length) of marks that returned Ok.
    completed: Vec<(u64, u64, u64)>,
    attempted: Vec<(u64, u64)>,
    errors: u64,
    /// Sequence number taken when the latest clear of "mid" returned (any
    /// outcome): marks of "mid" that started before may legitimately be gone.
    last_clear: u64,
    /// First sequence number of the next life.
    next_seq: u64,
    /// Relocations that returned Ok / an error.
    relocations_ok: u64,
    relocations_failed: u64,
}

/// What a life does besides marking.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Marks, checkpoints and clears only.
    Plain,
    /// Also moves the bitmaps to another file of the machine once.
    Relocate,
}

fn open(store: Arc<SimStore>, rng: &mut Rng) -> DirtyTracker {
    let mut cfg = TrackerConfig::new(DISK);
    cfg.sidecar = Some(store);
    cfg.extent_size = EXTENT;
    cfg.flush_interval = Duration::from_millis(1 + rng.below(5));
    // Without carried hot extents the fine level is the only record of an
    // epoch's marks once the next checkpoint is durable: half the trials run
    // that way so that fine-level write-out bugs cannot hide behind the log.
    cfg.carry_hot_extents = rng.chance(50);
    DirtyTracker::open(cfg).expect("open the tracker")
}

/// A relocation's result, from the thread that did it.
struct Relocated {
    ok: bool,
    /// Sequence number taken with the markers paused, before the call.
    seq: u64,
    /// The old file's mutation count when the call returned.
    old_mutations: u64,
}

/// One life: mark from several threads, cut at a random instant. With
/// [`Plan::Relocate`], a thread pauses the markers (as the pivot pauses guest
/// I/O) and relocates the tracker to a second file of the same machine at a
/// random instant. Returns what survives of the file the tracker used last
/// (the new one if the relocation returned Ok: vubd would restart on the new
/// image), after checking the old file of a relocation.
fn life(
    seed: u64,
    store: &Arc<SimStore>,
    tracker: &Arc<DirtyTracker>,
    rng: &mut Rng,
    record: &mut Record,
    plan: Plan,
) -> Option<Vec<u8>> {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(record.next_seq + 1));
    // Markers hold it shared around each mark; the relocation exclusively.
    let gate = Arc::new(RwLock::new(()));
    let threads = 2 + rng.below(2);
    let mut handles = Vec::new();
    for t in 0..threads {
        let tracker = tracker.clone();
        let stop = stop.clone();
        let ops = ops.clone();
        let seq = seq.clone();
        let gate = gate.clone();
        let mut rng = Rng(rng.next() ^ t);
        handles.push(std::thread::spawn(move || {
            let mut rec = Record::default();
            // Some locality: a few hot areas plus random spread.
            let hot: Vec<u64> = (0..3).map(|_| rng.below(DISK)).collect();
            while !stop.load(Ordering::Relaxed) {
                let base = if rng.chance(85) {
                    (hot[rng.below(3) as usize] + rng.below(MIB)) % DISK
                } else {
                    rng.below(DISK)
                };
                let off = base & !511;
                let max_sectors = if rng.chance(90) { 16 } else { 512 };
                let len = ((1 + rng.below(max_sectors)) * 512).min(DISK - off);
                rec.attempted.push((off, len));
                let paused = gate.read().unwrap();
                let s = seq.fetch_add(1, Ordering::SeqCst);
                match tracker.mark(off, len) {
                    Ok(()) => rec.completed.push((s, off, len)),
                    Err(_) => rec.errors += 1,
                }
                drop(paused);
                ops.fetch_add(1, Ordering::Relaxed);
                if rng.chance(5) {
                    std::thread::yield_now();
                }
            }
            rec
        }));
    }
    // Management side: forced checkpoints, and clears of "mid" (whose
    // durable checkpoints start an empty log).
    let cp_stop = stop.clone();
    let cp_tracker = tracker.clone();
    let cp_seq = seq.clone();
    let mut cp_rng = Rng(rng.next());
    let checkpointer = std::thread::spawn(move || {
        let mut last_clear = 0;
        while !cp_stop.load(Ordering::Relaxed) {
            if cp_rng.chance(30) {
                let _ = cp_tracker.checkpoint_now();
            }
            if cp_rng.chance(5) {
                // Marks that start after the clear returned must survive it.
                let _ = cp_tracker.clear("mid");
                last_clear = cp_seq.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_micros(200 + cp_rng.below(2000)));
        }
        last_clear
    });
    let relocator = (plan == Plan::Relocate).then(|| {
        // The new file: none, or a stale sidecar that must not survive.
        let stale = rng.chance(30).then(|| store.durable()).flatten();
        let to = Arc::new(store.sibling(stale));
        let from = store.clone();
        let (tracker, stop, ops, seq, gate) = (
            tracker.clone(),
            stop.clone(),
            ops.clone(),
            seq.clone(),
            gate.clone(),
        );
        // Early (most of the life then runs on the new file) or late.
        let range = if rng.chance(50) { 200 } else { 1500 };
        let target = rng.below(range);
        let cut_right_after = rng.chance(25);
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            while ops.load(Ordering::Relaxed) < target
                && start.elapsed() < Duration::from_millis(150)
            {
                if stop.load(Ordering::Relaxed) || from.is_dead() {
                    return None;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            let _paused = gate.write().unwrap();
            let s = seq.fetch_add(1, Ordering::SeqCst);
            let ok = tracker.relocate(to).is_ok();
            let old_mutations = from.mutations();
            if ok && cut_right_after {
                // Power loss right after the pivot.
                from.cut();
            }
            Some(Relocated {
                ok,
                seq: s,
                old_mutations,
            })
        });
        (handle, store.state.lock().unwrap().files.len() - 1)
    });
    if rng.chance(50) {
        store.set_fail_percent(1 + rng.below(5));
    }
    // The cut: half the time after a random number of marks, half the time
    // at a random sync (between two protocol steps), within a time limit.
    let start = Instant::now();
    if rng.chance(50) {
        let target = rng.below(3000);
        while ops.load(Ordering::Relaxed) < target && start.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_micros(50 + rng.below(200)));
        }
    } else {
        let syncs_so_far = store.state.lock().unwrap().syncs;
        store.cut_at_sync(syncs_so_far + 1 + rng.below(100));
        while !store.is_dead() && start.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    store.cut();
    // Marks keep going a moment after the cut: Ok results then come only
    // from extents that were durable before it.
    std::thread::sleep(Duration::from_micros(rng.below(500)));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let rec = h.join().expect("marker thread");
        record.completed.extend(rec.completed);
        record.attempted.extend(rec.attempted);
        record.errors += rec.errors;
    }
    let last_clear = checkpointer.join().expect("checkpoint thread");
    record.last_clear = record.last_clear.max(last_clear);
    // The next life numbers its marks after everything of this one.
    record.next_seq = seq.load(Ordering::SeqCst);
    let survivors = store.state.lock().unwrap().survivors.clone();
    let survivors = survivors.expect("the power was cut");
    let Some((handle, new_file)) = relocator else {
        return survivors[store.file].clone();
    };
    match handle.join().expect("relocation thread") {
        Some(r) if r.ok => {
            record.relocations_ok += 1;
            assert_eq!(
                store.mutations(),
                r.old_mutations,
                "seed {seed}: the old sidecar was written after the relocation"
            );
            check_old_file(seed, survivors[store.file].clone(), record, r.seq);
            survivors[new_file].clone()
        }
        Some(_) => {
            record.relocations_failed += 1;
            survivors[store.file].clone()
        }
        None => survivors[store.file].clone(),
    }
}

/// The sidecar left behind by a relocation (at sequence number `before`)
/// must still hold every mark completed before it: it stays the bitmap of
/// the old image, which is left as it was at the pivot. ("mid" is skipped:
/// its clears race with the relocation.)
fn check_old_file(seed: u64, survivor: Option<Vec<u8>>, record: &Record, before: u64) {
    let mem = MemStore::new();
    mem.set_contents(survivor);
    let rec =
        recover(&mem, DISK).unwrap_or_else(|e| panic!("seed {seed}: old file unreadable: {e}"));
    assert_eq!(rec.bitmaps.len(), 4, "seed {seed}: old file lost bitmaps");
    for b in &rec.bitmaps {
        assert!(
            !b.inconsistent,
            "seed {seed}: old '{}' inconsistent",
            b.name
        );
        if b.name == "mid" {
            continue;
        }
        let required: Vec<(u64, u64)> = if b.name == "off" {
            Vec::new()
        } else {
            record
                .completed
                .iter()
                .filter(|(s, _, _)| *s < before)
                .map(|&(_, o, l)| (o, l))
                .collect()
        };
        let need = chunks_of(&required, b.granularity);
        let missed = need
            .iter()
            .enumerate()
            .filter(|&(c, &n)| n && !b.bitmap.get_chunk(c as u64))
            .count();
        assert_eq!(
            missed, 0,
            "seed {seed}: old file's '{}' lost {missed} chunk(s) marked before the relocation",
            b.name
        );
        if b.name == "off" {
            assert_eq!(b.bitmap.dirty_chunks(), 0, "seed {seed}: old 'off' marked");
        }
    }
}

fn chunks_of<'a>(ranges: impl IntoIterator<Item = &'a (u64, u64)>, g: u64) -> Vec<bool> {
    let mut v = vec![false; DISK.div_ceil(g) as usize];
    for &(off, len) in ranges.into_iter() {
        for c in off / g..=(off + len - 1) / g {
            v[c as usize] = true;
        }
    }
    v
}

#[derive(Default)]
struct Totals {
    trials: u64,
    completed_marks: u64,
    failed_marks: u64,
    recovered_chunks: HashMap<&'static str, u64>,
    needed_chunks: HashMap<&'static str, u64>,
    over_chunks: HashMap<&'static str, u64>,
    max_over_extents: u64,
    relocations_ok: u64,
    relocations_failed: u64,
}

fn trial(seed: u64, totals: &mut Totals, plan: Plan) {
    let mut rng = Rng(seed);
    let mut record = Record::default();
    // Life 1: a fresh sidecar.
    let store = Arc::new(SimStore::new(None, rng.next()));
    let tracker = Arc::new(open(store.clone(), &mut rng));
    for (name, g) in BITMAPS {
        tracker.add(name, Some(g), true, false).expect("add bitmap");
    }
    tracker
        .add("off", Some(65536), true, true)
        .expect("add disabled bitmap");
    let survivor = life(seed, &store, &tracker, &mut rng, &mut record, plan);
    drop(tracker);
    // Life 2: start from what survived, like vubd after the power returns.
    let store = Arc::new(SimStore::new(survivor, rng.next()));
    let tracker = Arc::new(open(store.clone(), &mut rng));
    let listed = tracker.list();
    assert_eq!(
        listed.len(),
        4,
        "seed {seed}: bitmaps lost after the first cut: {listed:?}"
    );
    assert!(
        listed.iter().all(|b| !b.inconsistent),
        "seed {seed}: a power cut made a bitmap inconsistent: {listed:?}"
    );
    let survivor = life(seed, &store, &tracker, &mut rng, &mut record, plan);
    drop(tracker);

    let mem = MemStore::new();
    mem.set_contents(survivor);
    let rec = recover(&mem, DISK).unwrap_or_else(|e| panic!("seed {seed}: recovery failed: {e}"));
    assert_eq!(rec.bitmaps.len(), 4, "seed {seed}");
    totals.trials += 1;
    totals.relocations_ok += record.relocations_ok;
    totals.relocations_failed += record.relocations_failed;
    totals.completed_marks += record.completed.len() as u64;
    totals.failed_marks += record.errors;
    for b in &rec.bitmaps {
        assert!(
            !b.inconsistent,
            "seed {seed}: '{}' inconsistent after a power cut",
            b.name
        );
        if b.name == "off" {
            assert!(!b.recording);
            assert_eq!(
                b.bitmap.dirty_chunks(),
                0,
                "seed {seed}: disabled bitmap got marks"
            );
            continue;
        }
        assert!(
            b.recording,
            "seed {seed}: '{}' lost its recording state",
            b.name
        );
        let g = b.granularity;
        let min_seq = if b.name == "mid" {
            record.last_clear
        } else {
            0
        };
        let required: Vec<(u64, u64)> = record
            .completed
            .iter()
            .filter(|(s, _, _)| *s > min_seq)
            .map(|&(_, o, l)| (o, l))
            .collect();
        let need = chunks_of(&required, g);
        let attempted = chunks_of(&record.attempted, g);
        let mut missed = Vec::new();
        for (c, &n) in need.iter().enumerate() {
            if n && !b.bitmap.get_chunk(c as u64) {
                missed.push(c);
            }
        }
        assert!(
            missed.is_empty(),
            "seed {seed}: bitmap '{}' lost {} chunk(s) whose mark completed, e.g. {:?}",
            b.name,
            missed.len(),
            &missed[..missed.len().min(10)]
        );
        let over = (0..b.bitmap.chunks())
            .filter(|&c| b.bitmap.get_chunk(c) && !attempted[c as usize])
            .count() as u64;
        let name = BITMAPS
            .iter()
            .find(|(n, _)| *n == b.name)
            .map(|(n, _)| *n)
            .unwrap_or("?");
        *totals.recovered_chunks.entry(name).or_default() += b.bitmap.dirty_chunks();
        *totals.needed_chunks.entry(name).or_default() +=
            need.iter().filter(|&&x| x).count() as u64;
        *totals.over_chunks.entry(name).or_default() += over;
    }
    totals.max_over_extents = totals.max_over_extents.max(rec.log_extents);
}

#[test]
fn power_loss_never_loses_a_completed_mark() {
    let totals = simulate(Plan::Plain, "DIRTY_POWERLOSS_TRIALS", 2000);
    assert!(
        totals.completed_marks > 0,
        "no mark ever completed: the test tested nothing"
    );
}

/// The same with a relocation (the mirror's pivot to a new sidecar) in the
/// middle of each life: 0 missed chunks in the new file, and the old one
/// untouched after the relocation and complete up to it.
#[test]
fn power_loss_across_relocation_never_loses_a_completed_mark() {
    let totals = simulate(Plan::Relocate, "DIRTY_RELOCATE_TRIALS", 500);
    assert!(
        totals.completed_marks > 0,
        "no mark ever completed: the test tested nothing"
    );
    assert!(
        totals.relocations_ok > totals.trials / 2,
        "too few relocations succeeded ({} of {} lives): the test tested little",
        totals.relocations_ok,
        totals.trials * 2
    );
}

/// Runs the trials (their number from `env`, else `default`) and prints the
/// figures.
fn simulate(plan: Plan, env: &str, default: u64) -> Totals {
    let trials: u64 = std::env::var(env)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let base: u64 = std::env::var("DIRTY_POWERLOSS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0000);
    let start = Instant::now();
    let mut totals = Totals::default();
    for i in 0..trials {
        trial(base + i, &mut totals, plan);
    }
    println!(
        "power-loss simulation{}: {} trials (2 cuts each) in {:.1}s, {} marks completed, {} failed (in flight at a cut or injected errors), 0 missed chunks",
        if plan == Plan::Relocate {
            format!(
                " with relocation ({} relocations returned Ok, {} failed)",
                totals.relocations_ok, totals.relocations_failed
            )
        } else {
            String::new()
        },
        totals.trials,
        start.elapsed().as_secs_f64(),
        totals.completed_marks,
        totals.failed_marks
    );
    for (name, g) in BITMAPS {
        let rec = totals.recovered_chunks.get(name).copied().unwrap_or(0);
        let over = totals.over_chunks.get(name).copied().unwrap_or(0);
        let need = totals.needed_chunks.get(name).copied().unwrap_or(0);
        println!(
            "  bitmap {name:>6} (granularity {g:>7}): recovered {rec} chunks, {need} needed, over-marked {over} ({:.1}% of recovered; avg {:.1} chunks = {:.1} KiB per trial)",
            if rec > 0 { over as f64 * 100.0 / rec as f64 } else { 0.0 },
            over as f64 / totals.trials.max(1) as f64,
            over as f64 * g as f64 / 1024.0 / totals.trials.max(1) as f64,
        );
    }
    println!(
        "  activity-log extents applied by one recovery: at most {} of {} ({} KiB each)",
        totals.max_over_extents,
        DISK.div_ceil(EXTENT),
        EXTENT / 1024
    );
    totals
}

/// A clear that returned must not come back after a power cut, while a mark
/// made after it must.
#[test]
fn cleared_bitmap_stays_cleared_after_power_cut() {
    for seed in 0..200 {
        let mut rng = Rng(seed);
        let store = Arc::new(SimStore::new(None, rng.next()));
        let tracker = open(store.clone(), &mut rng);
        tracker.add("b", Some(65536), true, false).expect("add");
        for _ in 0..50 {
            tracker.mark(rng.below(DISK - 4096), 4096).expect("mark");
        }
        tracker.clear("b").expect("clear");
        let after = rng.below(DISK - 4096);
        tracker.mark(after, 4096).expect("mark after clear");
        let survivor = store.cut();
        drop(tracker);
        let mem = MemStore::new();
        mem.set_contents(survivor);
        let rec = recover(&mem, DISK).expect("recover");
        let b = &rec.bitmaps[0].bitmap;
        assert!(b.get(after), "seed {seed}: mark after clear lost");
        // Only the extent(s) of the post-clear write may be set.
        let allowed = (
            after / EXTENT * EXTENT,
            (after + 4095) / EXTENT * EXTENT + EXTENT,
        );
        for (off, len) in b.dirty_ranges() {
            assert!(
                off >= allowed.0 && off + len <= allowed.1,
                "seed {seed}: pre-clear data came back at {off}+{len}"
            );
        }
    }
}

//! [`DirtyTracker`]: every dirty bitmap of one disk, the calls the data path
//! makes around each guest write, the management operations, and the
//! persistence machinery (activity log + lazy fine-level write-out).
//!
//! # Durability protocol (docs/bitmap-format.md has the full argument)
//!
//! The disk is cut into *extents* (4 MiB by default). For the current
//! *epoch* E there is an in-memory activity log `AL_E` (one bit per extent)
//! backed by sidecar slot `E % 2`. A mark of a persistent, recording bitmap:
//!
//! 1. sets the fine bits in memory (lock-free, `AtomicU64::fetch_or`);
//! 2. issues a SeqCst fence and loads the current epoch's log;
//! 3. if every touched extent is already durable in that log: returns — no
//!    lock, no syscall (the hot path);
//! 4. otherwise requests the extent bits and waits for a group commit
//!    (one `pwrite` of the changed log pages + one `fdatasync`, shared by all
//!    markers waiting at that moment) — then returns.
//!
//! A checkpoint (timer, management operation, clean shutdown) starts epoch
//! E+1: it writes slot `(E+1) % 2` (header "epoch E+1" + the extents
//! touched during E, so hot extents stay logged), syncs, switches the
//! current log, fences, writes the fine-level pages that changed, syncs, and
//! then writes state block "generation E+1", syncs. Recovery takes the newest
//! valid state block G and ORs into each recording bitmap's fine level every
//! extent of every log slot whose epoch is >= G.
//!
//! # Relocation (the mirror's pivot)
//!
//! [`DirtyTracker::relocate`] moves the bitmaps to another sidecar: it is
//! the "file replacement" that adding a bitmap does, written into the new
//! store instead of the current one. The new log epoch is bound to the new
//! store (`AlEpoch::store`), so a commit always writes the file its slot
//! offset belongs to; the old file is left as it was, complete for every
//! mark made before (those went to the old image).
//!
//! # Why a mark is never lost
//!
//! A marker sets its fine bit, fences, then loads the log; a checkpoint
//! stores the new log, fences, then reads the fine bits. With two SeqCst
//! fences one of the two sees the other: either the marker saw epoch E+1
//! and made its extent durable in slot `(E+1) % 2` (whose header was durable
//! before the switch), or the checkpoint's fine-level snapshot contains the
//! bit. Until state block E+1 is durable, recovery still uses G = E and
//! applies slot `E % 2` too; a log is only reused (retired) after the state
//! block of the epoch after it is durable.

use super::bitmap::{DirtyBitmap, PAGE_BYTES};
use super::format::{recover, Layout, BITMAP_RECORDING, PAGE, STATE_CLEAN};
use super::store::{took_effect, FileStore, MetaStore};
use super::{
    check_granularity, DirtyError, DEFAULT_EXTENT_SIZE, DEFAULT_FLUSH_INTERVAL,
    DEFAULT_GRANULARITY, MAX_NAME_LEN,
};
use arc_swap::ArcSwap;
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod txn;
pub use txn::BitmapTxn;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How to build a [`DirtyTracker`].
#[derive(Clone)]
pub struct TrackerConfig {
    /// Size of the disk in bytes.
    pub disk_size: u64,
    /// Where persistent bitmaps live; `None`: only in-memory bitmaps.
    pub sidecar: Option<Arc<dyn MetaStore>>,
    /// Interval of the lazy fine-level write-out (CLI `--bitmap-flush-interval`).
    pub flush_interval: Duration,
    /// Activity-log extent size (power of two, >= 64 KiB), for new sidecars.
    pub extent_size: u64,
    /// The disk is read-only: the sidecar is loaded but never written.
    pub read_only: bool,
    /// Carry the extents touched during an epoch into the next epoch's log
    /// (DRBD's "hot extents"): a steady workload then pays no log commit
    /// after a checkpoint, at the price of more over-marking after a crash
    /// (extents of the last two epochs instead of one). Default on.
    pub carry_hot_extents: bool,
}

impl TrackerConfig {
    /// In-memory bitmaps only, defaults elsewhere.
    pub fn new(disk_size: u64) -> Self {
        TrackerConfig {
            disk_size,
            sidecar: None,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            extent_size: DEFAULT_EXTENT_SIZE,
            read_only: false,
            carry_hot_extents: true,
        }
    }

    /// With the sidecar file beside `image` (`IMAGE.vubd-bitmaps`).
    pub fn for_image(image: &Path, disk_size: u64) -> Self {
        let store: Arc<dyn MetaStore> = Arc::new(FileStore::new(super::sidecar_path(image)));
        TrackerConfig {
            sidecar: Some(store),
            ..Self::new(disk_size)
        }
    }
}

/// One bitmap as `query-block` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes: dirty chunks times the granularity (QEMU's count).
    pub count: u64,
    /// Guest writes mark it.
    pub recording: bool,
    /// In use by a job; may not be changed.
    pub busy: bool,
    /// Stored in the sidecar.
    pub persistent: bool,
    /// Its stored copy could not be trusted.
    pub inconsistent: bool,
}

/// Counters of the persistence machinery, for tests and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Marks that had to wait for an activity-log commit (slow path).
    pub log_waits: u64,
    /// Activity-log commits (each one pwrite batch + one fdatasync).
    pub log_commits: u64,
    /// Total time marks spent waiting for log commits, in microseconds.
    pub log_wait_us: u64,
    /// Completed checkpoints (fine level written, state block durable).
    pub checkpoints: u64,
    /// Failed checkpoints (retried on the next tick).
    pub checkpoint_failures: u64,
    /// At open: activity-log extents that recovery applied.
    pub recovered_log_extents: u64,
    /// At open: chunks recovery set from the activity log only (the
    /// over-marking bound of the last unclean stop, over all bitmaps).
    pub recovered_chunks_from_log: u64,
    /// At open: the last stop was clean.
    pub recovered_clean: bool,
}

struct Named {
    name: String,
    bitmap: Arc<DirtyBitmap>,
    persistent: bool,
    inconsistent: bool,
    readonly: bool,
    busy: AtomicBool,
}

impl Named {
    /// A new, empty bitmap as `block-dirty-bitmap-add` creates it (checked
    /// for a name that already exists by the caller).
    fn new_empty(
        name: &str,
        disk_size: u64,
        granularity: u64,
        persistent: bool,
        disabled: bool,
    ) -> Result<Arc<Named>, DirtyError> {
        if name.len() > MAX_NAME_LEN {
            return Err(DirtyError::NameTooLong(name.to_string()));
        }
        let bitmap = DirtyBitmap::new(disk_size, granularity, persistent)?;
        bitmap.set_recording(!disabled);
        Ok(Arc::new(Named {
            name: name.to_string(),
            bitmap: Arc::new(bitmap),
            persistent,
            inconsistent: false,
            readonly: false,
            busy: AtomicBool::new(false),
        }))
    }
}

const AL_LIVE: u8 = 0;
const AL_NO_FILE: u8 = 1;
const AL_CLOSED: u8 = 2;
const AL_FAILED: u8 = 3;

/// The activity log of one epoch.
struct AlEpoch {
    epoch: u64,
    /// The sidecar holding this log's slot. Bound to the epoch rather than
    /// read from the tracker, so that a commit always writes the file whose
    /// layout `slot_off` refers to, even across a relocation.
    store: Option<Arc<dyn MetaStore>>,
    /// Absolute offset of the slot's header page (bits follow at +4 KiB).
    slot_off: u64,
    kind: AtomicU8,
    requested: Box<[AtomicU64]>,
    durable: Box<[AtomicU64]>,
    touched: Box<[AtomicU64]>,
    retired: AtomicBool,
    committing: Mutex<bool>,
    cv: Condvar,
}

impl AlEpoch {
    fn new(
        epoch: u64,
        store: Option<Arc<dyn MetaStore>>,
        slot_off: u64,
        nwords: usize,
        kind: u8,
        prepop: &[u64],
        prepop_durable: bool,
    ) -> Self {
        let mk = |v: &dyn Fn(usize) -> u64| {
            (0..nwords)
                .map(|i| AtomicU64::new(v(i)))
                .collect::<Box<[_]>>()
        };
        let pre = |i: usize| prepop.get(i).copied().unwrap_or(0);
        AlEpoch {
            epoch,
            store,
            slot_off,
            kind: AtomicU8::new(kind),
            requested: mk(&pre),
            durable: mk(&|i| if prepop_durable { pre(i) } else { 0 }),
            touched: mk(&|_| 0),
            retired: AtomicBool::new(false),
            committing: Mutex::new(false),
            cv: Condvar::new(),
        }
    }

    fn kind(&self) -> u8 {
        self.kind.load(Ordering::Acquire)
    }

    fn is_durable(&self, e: u64) -> bool {
        self.durable[(e / 64) as usize].load(Ordering::Acquire) & (1 << (e % 64)) != 0
    }

    fn touch(&self, e: u64) {
        let w = &self.touched[(e / 64) as usize];
        let bit = 1 << (e % 64);
        if w.load(Ordering::Relaxed) & bit == 0 {
            w.fetch_or(bit, Ordering::Relaxed);
        }
    }

    fn request(&self, e: u64) {
        self.requested[(e / 64) as usize].fetch_or(1 << (e % 64), Ordering::AcqRel);
    }

    fn snapshot(words: &[AtomicU64]) -> Vec<u64> {
        words.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    fn is_empty(&self) -> bool {
        self.requested
            .iter()
            .all(|w| w.load(Ordering::Relaxed) == 0)
    }

    /// No marker will write this log's slot again: its extents are covered by
    /// a durable checkpoint. Waiting markers return successfully.
    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        let _g = lock(&self.committing);
        self.cv.notify_all();
    }

    fn set_kind(&self, kind: u8) {
        self.kind.store(kind, Ordering::Release);
        let _g = lock(&self.committing);
        self.cv.notify_all();
    }
}

/// The persistence machinery. It exists even without a sidecar (its log is
/// then a no-file log), so that [`DirtyTracker::relocate`] can give a tracker
/// opened without one a place for persistent bitmaps later. The sidecar
/// itself is `Control::store` (and, for log commits, `AlEpoch::store`).
struct Persist {
    extent_shift: u32,
    nwords: usize,
    al: ArcSwap<AlEpoch>,
    /// Held for reading by log commits, for writing while a log is retired or
    /// the file is replaced, so no commit writes into a slot being reused.
    layout_lock: RwLock<()>,
    flush_interval_ms: AtomicU64,
    carry_hot_extents: bool,
    wake: Mutex<Wake>,
    wake_cv: Condvar,
    stats: Stats,
}

#[derive(Default)]
struct Wake {
    kick: bool,
    stop: bool,
}

#[derive(Default)]
struct Stats {
    log_waits: AtomicU64,
    log_commits: AtomicU64,
    log_wait_us: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_failures: AtomicU64,
}

/// State changed only under the control mutex: management operations and
/// checkpoints are serialized by it.
struct Control {
    /// The sidecar (`None`: persistent bitmaps cannot be stored). Changed
    /// only by a relocation, together with `layout` and the current log.
    store: Option<Arc<dyn MetaStore>>,
    /// The layout of the file in `store` (`None` while it holds no bitmaps).
    layout: Option<Layout>,
    durable_gen: u64,
    prev_al: Option<Arc<AlEpoch>>,
    full_writeout: bool,
    closed: bool,
    recovered: TrackerStats,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Next log prepopulated with the extents touched in this epoch.
    Periodic,
    /// Next log empty (after a clear: old extents must not come back).
    Fresh,
    /// Clean shutdown: the next log takes no marks, the state says clean.
    Final,
}

struct Inner {
    disk_size: u64,
    read_only: bool,
    bitmaps: ArcSwap<Vec<Arc<Named>>>,
    /// Volatile bitmaps that guest writes mark beside the named ones: the
    /// successors of bitmaps a backup job holds ([`Frozen`]).
    successors: ArcSwap<Vec<Arc<DirtyBitmap>>>,
    persist: Persist,
    control: Mutex<Control>,
}

impl Inner {
    /// The persistent bitmaps, in the order they were added (file order).
    fn persistent_bitmaps(&self) -> Vec<Arc<Named>> {
        self.bitmaps
            .load()
            .iter()
            .filter(|b| b.persistent)
            .cloned()
            .collect()
    }
}

/// What a backup job holds on a bitmap between
/// [`DirtyTracker::begin_backup`] and [`DirtyTracker::end_backup`].
pub struct Frozen {
    name: String,
    /// The bits at the job's start: what a `sync: bitmap` job copies.
    pub copy: DirtyBitmap,
    /// The writes since the start (volatile, at the bitmap's granularity).
    pub successor: Arc<DirtyBitmap>,
    /// Whether the successor records (a disabled bitmap's does not).
    recording: bool,
}

impl std::fmt::Debug for Frozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frozen").field("name", &self.name).finish()
    }
}

/// All dirty bitmaps of one disk. Share it (`Arc`) between the queue threads
/// (which call [`DirtyTracker::mark`]) and the management plane.
pub struct DirtyTracker {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("bitmaps", &self.list())
            .finish()
    }
}

fn new_file_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

impl DirtyTracker {
    /// Opens the tracker: loads and recovers the persistent bitmaps from the
    /// sidecar (if configured and present), rewrites the sidecar so that the
    /// recovered state is the new durable base, and starts the background
    /// write-out thread. Damaged sidecars never fail this call (their
    /// bitmaps load as inconsistent, with an error logged); I/O errors and a
    /// sidecar from a newer vubd do.
    pub fn open(config: TrackerConfig) -> Result<DirtyTracker, DirtyError> {
        let disk_size = config.disk_size;
        if !config.extent_size.is_power_of_two() || config.extent_size < 65536 {
            return Err(DirtyError::PersistenceUnavailable(format!(
                "activity-log extent size {} must be a power of two of at least 64 KiB",
                config.extent_size
            )));
        }
        let mut named = Vec::new();
        let mut recovered = TrackerStats::default();
        let mut epoch0 = 0;
        let extent_size = config.extent_size;
        let mut had_valid_empty_file = false;
        if let Some(store) = &config.sidecar {
            let rec = recover(store.as_ref(), disk_size)?;
            if rec.existed {
                let from_log: u64 = rec.bitmaps.iter().map(|b| b.chunks_from_log).sum();
                log::info!(
                    "bitmap sidecar {}: {} bitmap(s), last stop {}; activity log: {} extent(s), {} chunk(s) added",
                    store.describe(),
                    rec.bitmaps.len(),
                    if rec.clean { "clean" } else { "unclean" },
                    rec.log_extents,
                    from_log
                );
                recovered.recovered_log_extents = rec.log_extents;
                recovered.recovered_chunks_from_log = from_log;
                recovered.recovered_clean = rec.clean;
                had_valid_empty_file = rec.damage.is_none() && rec.bitmaps.is_empty();
            }
            epoch0 = rec.generation;
            for rb in rec.bitmaps {
                let bitmap = rb.bitmap;
                bitmap.set_recording(rb.recording && !rb.inconsistent);
                named.push(Arc::new(Named {
                    name: rb.name,
                    bitmap: Arc::new(bitmap),
                    persistent: true,
                    inconsistent: rb.inconsistent,
                    readonly: config.read_only,
                    busy: AtomicBool::new(false),
                }));
            }
        }
        let extent_shift = extent_size.trailing_zeros();
        let nwords = disk_size.div_ceil(extent_size).div_ceil(64).max(1) as usize;
        let persist = Persist {
            extent_shift,
            nwords,
            al: ArcSwap::from_pointee(AlEpoch::new(
                epoch0,
                None,
                0,
                nwords,
                AL_NO_FILE,
                &[],
                false,
            )),
            layout_lock: RwLock::new(()),
            flush_interval_ms: AtomicU64::new(config.flush_interval.as_millis().max(1) as u64),
            carry_hot_extents: config.carry_hot_extents,
            wake: Mutex::new(Wake::default()),
            wake_cv: Condvar::new(),
            stats: Stats::default(),
        };
        let inner = Arc::new(Inner {
            disk_size,
            read_only: config.read_only,
            successors: ArcSwap::from_pointee(Vec::new()),
            bitmaps: ArcSwap::from_pointee(named.clone()),
            persist,
            control: Mutex::new(Control {
                store: config.sidecar.clone(),
                layout: None,
                durable_gen: epoch0,
                prev_al: None,
                full_writeout: false,
                closed: false,
                recovered,
            }),
        });
        if let (Some(store), false) = (&config.sidecar, config.read_only) {
            // A file staged by a process killed before it was put in place
            // (a transaction's or a pivot's) is no part of any state.
            store.discard_staged();
            let mut ctl = lock(&inner.control);
            if !named.is_empty() {
                inner
                    .persist
                    .relayout(&inner, &mut ctl, &named, store, None, false)?;
            } else if had_valid_empty_file {
                store.remove().map_err(|e| {
                    DirtyError::io(format!("removing empty {}", store.describe()), e)
                })?;
            }
        }
        let tracker = DirtyTracker {
            inner,
            thread: Mutex::new(None),
        };
        if config.sidecar.is_some() {
            tracker.ensure_thread()?;
        }
        Ok(tracker)
    }

    /// Starts the background write-out thread unless it runs already (or the
    /// disk is read-only: nothing is written then). Call without holding the
    /// control lock: [`DirtyTracker::shutdown`] joins the thread, which takes
    /// that lock, while it holds the thread slot.
    fn ensure_thread(&self) -> Result<(), DirtyError> {
        if self.inner.read_only {
            return Ok(());
        }
        let mut slot = lock(&self.thread);
        // Running, or stopped for good by `shutdown`/drop.
        if slot.is_some() || lock(&self.inner.persist.wake).stop {
            return Ok(());
        }
        let inner = self.inner.clone();
        let handle = std::thread::Builder::new()
            .name("vubd-bitmaps".into())
            .spawn(move || {
                crate::thread_kind::started(crate::thread_kind::ThreadKind::BitmapWriter);
                background(inner)
            })
            .map_err(|e| DirtyError::io("starting the bitmap write-out thread", e))?;
        *slot = Some(handle);
        Ok(())
    }

    /// Size of the disk.
    pub fn disk_size(&self) -> u64 {
        self.inner.disk_size
    }

    // ------------------------------------------------------------------
    // Data path
    // ------------------------------------------------------------------

    /// Called before a guest write, discard or write-zeroes of `len` bytes at
    /// `offset` is issued to the image. Marks every recording bitmap for every
    /// chunk touched; for persistent bitmaps it
    /// returns only once the mark is recoverable after a crash (the extents
    /// are durable in the activity log). Lock-free and syscall-free when the
    /// extents are already logged. An error means the guarantee could not be
    /// established: fail the guest request without writing.
    pub fn mark(&self, offset: u64, len: u64) -> Result<(), DirtyError> {
        let inner = &*self.inner;
        if len == 0 || offset >= inner.disk_size {
            return Ok(());
        }
        let len = len.min(inner.disk_size - offset);
        for successor in inner.successors.load().iter() {
            successor.set_range(offset, len);
        }
        let mut log = false;
        for b in inner.bitmaps.load().iter() {
            if b.bitmap.mark_if_recording(offset, len) && b.persistent {
                log = true;
            }
        }
        if log {
            inner.persist.log(offset, len)
        } else {
            Ok(())
        }
    }

    /// Called after a guest FLUSH made the image durable. The crash guarantee
    /// does not depend on flushes (each mark is durable before its write is
    /// issued), so a flush never waits for bitmap I/O: this returns at once.
    /// The fine level is written by the background thread every flush interval.
    pub fn after_guest_flush(&self) -> Result<(), DirtyError> {
        Ok(())
    }

    // ------------------------------------------------------------------
    // Management
    // ------------------------------------------------------------------

    fn find(&self, name: &str) -> Result<Arc<Named>, DirtyError> {
        self.inner
            .bitmaps
            .load()
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .ok_or_else(|| DirtyError::NotFound(name.to_string()))
    }

    fn check(b: &Named, busy: bool, ro: bool, inconsistent: bool) -> Result<(), DirtyError> {
        if busy && b.busy.load(Ordering::Acquire) {
            return Err(DirtyError::Busy(b.name.clone()));
        }
        if ro && b.readonly {
            return Err(DirtyError::ReadOnly(b.name.clone()));
        }
        if inconsistent && b.inconsistent {
            return Err(DirtyError::Inconsistent(b.name.clone()));
        }
        Ok(())
    }

    fn control(&self) -> Result<MutexGuard<'_, Control>, DirtyError> {
        let ctl = lock(&self.inner.control);
        if ctl.closed {
            return Err(DirtyError::ShutDown);
        }
        Ok(ctl)
    }

    /// `block-dirty-bitmap-add`: a new bitmap, empty, recording unless
    /// `disabled`. `granularity` defaults to 64 KiB. A persistent bitmap is
    /// durable in the sidecar when this returns.
    pub fn add(
        &self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Result<(), DirtyError> {
        if name.is_empty() {
            return Err(DirtyError::EmptyName);
        }
        let granularity = granularity.unwrap_or(DEFAULT_GRANULARITY);
        check_granularity(granularity)?;
        let inner = &*self.inner;
        if persistent && inner.read_only {
            return Err(DirtyError::PersistenceUnavailable(
                "the image is read-only".into(),
            ));
        }
        let mut ctl = self.control()?;
        // Under the control lock: a relocation may have given us a sidecar.
        let store = match (persistent, &ctl.store) {
            (false, _) => None,
            (true, Some(store)) => Some(store.clone()),
            (true, None) => {
                return Err(DirtyError::PersistenceUnavailable(
                    "no sidecar file is configured".into(),
                ))
            }
        };
        if self.find(name).is_ok() {
            return Err(DirtyError::AlreadyExists(name.to_string()));
        }
        let entry = Named::new_empty(name, inner.disk_size, granularity, persistent, disabled)?;
        if let Some(store) = store {
            let mut files = inner.persistent_bitmaps();
            files.push(entry.clone());
            inner
                .persist
                .relayout(inner, &mut ctl, &files, &store, None, false)?;
        }
        inner.bitmaps.rcu(|v| {
            let mut v = Vec::clone(v);
            v.push(entry.clone());
            v
        });
        log::info!(
            "bitmap '{name}' added (granularity {granularity}, {}{})",
            if persistent {
                "persistent"
            } else {
                "in memory"
            },
            if disabled { ", disabled" } else { "" }
        );
        Ok(())
    }

    /// `block-dirty-bitmap-remove`.
    pub fn remove(&self, name: &str) -> Result<(), DirtyError> {
        let inner = &*self.inner;
        let mut ctl = self.control()?;
        let b = self.find(name)?;
        Self::check(&b, true, true, false)?;
        if let (true, Some(store)) = (b.persistent, ctl.store.clone()) {
            let files: Vec<Arc<Named>> = inner
                .persistent_bitmaps()
                .into_iter()
                .filter(|x| !Arc::ptr_eq(x, &b))
                .collect();
            inner
                .persist
                .relayout(inner, &mut ctl, &files, &store, None, false)?;
        }
        inner.bitmaps.rcu(|v| {
            v.iter()
                .filter(|x| !Arc::ptr_eq(x, &b))
                .cloned()
                .collect::<Vec<_>>()
        });
        log::info!("bitmap '{name}' removed");
        Ok(())
    }

    /// `block-dirty-bitmap-clear`. For a persistent bitmap the cleared state
    /// is durable when this returns (and old log extents no longer apply).
    pub fn clear(&self, name: &str) -> Result<(), DirtyError> {
        let inner = &*self.inner;
        let mut ctl = self.control()?;
        let b = self.find(name)?;
        Self::check(&b, true, true, true)?;
        b.bitmap.clear();
        if b.persistent {
            inner.persist.checkpoint(inner, &mut ctl, Mode::Fresh)?;
        }
        Ok(())
    }

    /// `block-dirty-bitmap-enable`.
    pub fn enable(&self, name: &str) -> Result<(), DirtyError> {
        self.set_recording(name, true)
    }

    /// `block-dirty-bitmap-disable`.
    pub fn disable(&self, name: &str) -> Result<(), DirtyError> {
        self.set_recording(name, false)
    }

    fn set_recording(&self, name: &str, on: bool) -> Result<(), DirtyError> {
        let inner = &*self.inner;
        let mut ctl = self.control()?;
        let b = self.find(name)?;
        Self::check(&b, true, false, true)?;
        if b.bitmap.is_recording() == on {
            return Ok(());
        }
        b.bitmap.set_recording(on);
        if b.persistent && !inner.read_only {
            // The state block must say "recording" before a mark may rely on
            // the activity log being applied to this bitmap at recovery.
            if let Err(e) = inner.persist.checkpoint(inner, &mut ctl, Mode::Periodic) {
                b.bitmap.set_recording(!on);
                return Err(e);
            }
        }
        Ok(())
    }

    /// `block-dirty-bitmap-merge`: ORs every source into `target`; all-or-
    /// nothing (every name and state is checked before any bit changes).
    /// Sources of other granularities map through byte ranges.
    pub fn merge(&self, target: &str, sources: &[&str]) -> Result<(), DirtyError> {
        let inner = &*self.inner;
        let mut ctl = self.control()?;
        let t = self.find(target)?;
        Self::check(&t, true, true, true)?;
        let mut srcs = Vec::with_capacity(sources.len());
        for s in sources {
            let b = self.find(s)?;
            Self::check(&b, true, false, true)?;
            srcs.push(b);
        }
        for s in &srcs {
            if !Arc::ptr_eq(s, &t) {
                t.bitmap.merge_from(&s.bitmap);
            }
        }
        if t.persistent {
            inner.persist.checkpoint(inner, &mut ctl, Mode::Periodic)?;
        }
        Ok(())
    }

    /// `x-debug-block-dirty-bitmap-sha256`: lowercase hex, as QEMU prints it.
    pub fn sha256(&self, name: &str) -> Result<String, DirtyError> {
        Ok(self.find(name)?.bitmap.sha256_hex())
    }

    /// Every bitmap, newest first (QEMU's `query-block` order).
    pub fn list(&self) -> Vec<BitmapInfo> {
        self.inner
            .bitmaps
            .load()
            .iter()
            .rev()
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: b.bitmap.granularity(),
                count: b.bitmap.count_bytes(),
                recording: b.bitmap.is_recording(),
                busy: b.busy.load(Ordering::Acquire),
                persistent: b.persistent,
                inconsistent: b.inconsistent,
            })
            .collect()
    }

    /// The bits of a bitmap, for readers (backup, NBD export, tests).
    pub fn bitmap(&self, name: &str) -> Result<Arc<DirtyBitmap>, DirtyError> {
        Ok(self.find(name)?.bitmap.clone())
    }

    /// Marks a bitmap as used by a job (`busy`), or releases it.
    pub fn set_busy(&self, name: &str, busy: bool) -> Result<(), DirtyError> {
        let b = self.find(name)?;
        if busy {
            Self::check(&b, true, false, true)?;
        }
        b.busy.store(busy, Ordering::Release);
        Ok(())
    }

    /// A backup job's start on bitmap `name` (QEMU's frozen bitmap and its
    /// successor), called with guest I/O held. The bitmap keeps recording,
    /// so what is stored never lacks a write; the writes from now on also
    /// go to a volatile successor, so the job's end can make the bitmap
    /// exactly "the writes since the start" ([`DirtyTracker::end_backup`]).
    pub fn begin_backup(&self, name: &str) -> Result<Frozen, DirtyError> {
        let b = self.find(name)?;
        let (size, gran) = (self.inner.disk_size, b.bitmap.granularity());
        let copy = DirtyBitmap::new(size, gran, false)?;
        copy.merge_from(&b.bitmap);
        let successor = Arc::new(DirtyBitmap::new(size, gran, false)?);
        // A disabled bitmap's successor records nothing, as in QEMU.
        let recording = b.bitmap.is_recording();
        if recording {
            self.inner.successors.rcu(|v| {
                let mut v = Vec::clone(v);
                v.push(successor.clone());
                v
            });
        }
        Ok(Frozen {
            name: name.to_string(),
            copy,
            successor,
            recording,
        })
    }

    /// A backup job's end, called with guest I/O held: the successor stops
    /// recording, the bitmap is released (no longer busy) and, if `new` is
    /// given (same granularity), its bits become `new`'s, with one atomic
    /// sidecar replacement if it is persistent. On error the bits are as
    /// before, a superset of the copy set and the writes since.
    pub fn end_backup(&self, frozen: &Frozen, new: Option<&DirtyBitmap>) -> Result<(), DirtyError> {
        if frozen.recording {
            self.inner.successors.rcu(|v| {
                v.iter()
                    .filter(|s| !Arc::ptr_eq(s, &frozen.successor))
                    .cloned()
                    .collect::<Vec<_>>()
            });
        }
        self.set_busy(&frozen.name, false)?;
        let Some(new) = new else {
            return Ok(());
        };
        let mut txn = self.transaction();
        txn.replace(&frozen.name, new)?;
        txn.prepare()?;
        txn.commit()
    }

    // ------------------------------------------------------------------
    // Persistence control
    // ------------------------------------------------------------------

    /// Sets the interval of the lazy fine-level write-out.
    pub fn set_flush_interval(&self, interval: Duration) {
        let p = &self.inner.persist;
        p.flush_interval_ms.store(
            interval.as_millis().clamp(1, u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
        p.kick();
    }

    /// The interval of the lazy fine-level write-out.
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.inner.persist.flush_interval_ms.load(Ordering::Relaxed))
    }

    /// Writes the fine level out now and starts a new log epoch (what the
    /// background thread does every interval); no-op without a sidecar.
    pub fn checkpoint_now(&self) -> Result<(), DirtyError> {
        let inner = &*self.inner;
        let mut ctl = self.control()?;
        if inner.read_only {
            return Ok(());
        }
        inner.persist.checkpoint(inner, &mut ctl, Mode::Periodic)
    }

    /// Makes `store` this disk's sidecar from now on: the mirror's pivot to a
    /// new image calls it, because bitmaps belong to the disk, not to the
    /// file, and the next start with `--image NEW` must find them complete.
    ///
    /// Writes a complete new sidecar into `store` (every persistent bitmap's
    /// current bits and recording state, the hot extents of the current log
    /// as its initial log) with [`MetaStore::replace`], so it is durable when
    /// this returns: recovery from `store` alone then holds every mark that
    /// returned before, and, as the activity log, write-outs and shutdown
    /// switch to `store` at the same time, every mark after. A stale file at
    /// `store` is overwritten; with no persistent bitmap it is removed (a
    /// sidecar there would claim bitmaps for the new image that it does not
    /// have), and `store` is only recorded, so that a later persistent `add`
    /// writes there — also when the tracker was opened without a sidecar.
    ///
    /// The old sidecar is not written again (it stays consistent with the old
    /// image as it was at the pivot; its last stop reads as unclean). On a
    /// read-only disk the new sidecar is still written once, so the bitmaps
    /// follow the disk, and never again.
    ///
    /// Precondition: no [`DirtyTracker::mark`] runs concurrently (the caller
    /// has paused guest I/O, e.g. under `Disk::gate().pause()`, and resumes
    /// it only on the new image). A mark that did race would wait for the
    /// switch and then be covered by the new file, or fail if the relocation
    /// fails; it is never lost. The background write-out and management
    /// calls may run: they serialize with this on the control lock.
    ///
    /// Errors: if the new sidecar cannot be written, the tracker keeps using
    /// the old one (nothing on the old file changes; its next write-out
    /// writes every page) and the error is returned — fail the pivot then.
    /// After [`DirtyTracker::shutdown`]: [`DirtyError::ShutDown`].
    pub fn relocate(&self, store: Arc<dyn MetaStore>) -> Result<(), DirtyError> {
        self.relocate_with(store, None)
    }

    /// The slow half of [`DirtyTracker::relocate`], done while guest I/O
    /// runs (before the pivot's pause): writes the complete new sidecar as
    /// it would be now under a temporary name and makes it durable
    /// ([`MetaStore::stage`]); nothing else changes, marks keep going to the
    /// current sidecar. [`DirtyTracker::relocate_prepared`] finishes it.
    ///
    /// Why this is safe (the guarantee of docs/bitmap-format.md: a recovered
    /// bitmap never misses a changed chunk): the staged file is not the
    /// sidecar of anything until it is renamed into place, so a crash before
    /// that recovers from the old sidecar, which stays complete for the old
    /// image (the disk until the pivot). The finishing half, with guest I/O
    /// paused (no mark in progress), rebuilds the file from the bits as they
    /// are then, writes only the pages that differ from what was staged (the
    /// marks made since), syncs them, and renames: so the file that appears
    /// at the new path is exactly what [`DirtyTracker::relocate`] would have
    /// written there at that instant, complete for every mark before, and
    /// every mark after goes to its log. The pause only pays for the pages
    /// changed meanwhile, one `fdatasync` (none if nothing changed), the
    /// rename and one directory `fsync`.
    pub fn prepare_relocation(
        &self,
        store: Arc<dyn MetaStore>,
    ) -> Result<PreparedRelocation, DirtyError> {
        let inner = &*self.inner;
        let ctl = self.control()?;
        let members = inner.persistent_bitmaps();
        let mut staged = None;
        if !members.is_empty() && !inner.read_only {
            staged = Some(self.stage(ctl, &members, &store)?);
        }
        Ok(PreparedRelocation { store, staged })
    }

    /// Writes the sidecar `members` would have now into `store`'s staging
    /// area (durable, but read by no recovery) so that a later
    /// [`Persist::relayout`] with it only writes what changed meanwhile.
    /// The control lock is released before the slow write. On error no
    /// staging file is left.
    fn stage(
        &self,
        ctl: MutexGuard<'_, Control>,
        members: &[Arc<Named>],
        store: &Arc<dyn MetaStore>,
    ) -> Result<Staged, DirtyError> {
        let inner = &*self.inner;
        let p = &inner.persist;
        let plan = plan_of(members);
        let file_id = new_file_id();
        let layout = Layout::plan(file_id, inner.disk_size, 1u64 << p.extent_shift, &plan);
        let cur = p.al.load_full();
        let next_epoch = cur.epoch.max(ctl.durable_gen) + 1;
        let prepop = p.prepop(&cur);
        let bytes = build_file(&layout, members, next_epoch, &prepop, false);
        drop(ctl);
        if let Err(e) = store.stage(&bytes) {
            // A half-written staging file is no trace to leave either.
            store.discard_staged();
            return Err(DirtyError::io(format!("staging {}", store.describe()), e));
        }
        Ok(Staged {
            file_id,
            plan,
            bytes,
        })
    }

    /// Finishes a relocation prepared by
    /// [`DirtyTracker::prepare_relocation`]: the same contract and the same
    /// precondition (guest I/O paused) as [`DirtyTracker::relocate`], at the
    /// cost described there.
    pub fn relocate_prepared(&self, prepared: PreparedRelocation) -> Result<(), DirtyError> {
        self.relocate_with(prepared.store.clone(), prepared.staged.as_ref())
    }

    fn relocate_with(
        &self,
        store: Arc<dyn MetaStore>,
        staged: Option<&Staged>,
    ) -> Result<(), DirtyError> {
        // Before the control lock: `shutdown` joins the thread while holding
        // the thread slot, and the thread takes the control lock.
        self.ensure_thread()?;
        let inner = &*self.inner;
        let mut ctl = self.control()?;
        let old = ctl.store.clone();
        let same = old.as_ref().is_some_and(|o| Arc::ptr_eq(o, &store));
        let members = inner.persistent_bitmaps();
        let started = Instant::now();
        if let Err(e) = inner
            .persist
            .relayout(inner, &mut ctl, &members, &store, staged, false)
        {
            // `replace` may have failed after the rename (directory sync):
            // a complete file could be left beside an image that is not the
            // disk. Remove it if it is surely not the file still in use.
            let other_file = old
                .as_ref()
                .is_none_or(|o| o.describe() != store.describe());
            if !same && other_file && !members.is_empty() {
                if let Err(re) = store.remove() {
                    log::warn!(
                        "bitmap sidecar {}: cannot remove after a failed relocation: {re}",
                        store.describe()
                    );
                }
            }
            log::error!(
                "moving dirty bitmaps from {} to {} failed, still using the former: {e}",
                describe(&old),
                store.describe()
            );
            return Err(e);
        }
        log::info!(
            "dirty bitmaps moved from {} to {} ({} persistent, {:?})",
            describe(&old),
            store.describe(),
            members.len(),
            started.elapsed()
        );
        Ok(())
    }

    /// Counters of the persistence machinery.
    pub fn stats(&self) -> TrackerStats {
        let mut s = lock(&self.inner.control).recovered.clone();
        let p = &self.inner.persist;
        s.log_waits = p.stats.log_waits.load(Ordering::Relaxed);
        s.log_commits = p.stats.log_commits.load(Ordering::Relaxed);
        s.log_wait_us = p.stats.log_wait_us.load(Ordering::Relaxed);
        s.checkpoints = p.stats.checkpoints.load(Ordering::Relaxed);
        s.checkpoint_failures = p.stats.checkpoint_failures.load(Ordering::Relaxed);
        s
    }

    /// Clean shutdown: stops the background thread and writes everything out
    /// with the "clean" flag, so the next start needs no activity log (no
    /// over-marking). Call after the data path has stopped; later marks of
    /// persistent bitmaps fail with [`DirtyError::ShutDown`]. Idempotent.
    pub fn shutdown(&self) -> Result<(), DirtyError> {
        self.stop_thread();
        let inner = &*self.inner;
        let mut ctl = lock(&inner.control);
        if ctl.closed {
            return Ok(());
        }
        let res = if inner.read_only {
            Ok(())
        } else {
            inner.persist.checkpoint(inner, &mut ctl, Mode::Final)
        };
        ctl.closed = true;
        inner.persist.al.load().set_kind(AL_CLOSED);
        res
    }

    fn stop_thread(&self) {
        let p = &self.inner.persist;
        lock(&p.wake).stop = true;
        p.wake_cv.notify_all();
        let handle = lock(&self.thread).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for DirtyTracker {
    /// Stops the background thread without a final write-out: like a crash,
    /// the next start recovers from the activity log.
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn background(inner: Arc<Inner>) {
    let p = &inner.persist;
    loop {
        {
            let mut w = lock(&p.wake);
            let deadline =
                Instant::now() + Duration::from_millis(p.flush_interval_ms.load(Ordering::Relaxed));
            while !w.stop && !w.kick {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                w = p
                    .wake_cv
                    .wait_timeout(w, deadline - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if w.stop {
                return;
            }
            w.kick = false;
        }
        let mut ctl = lock(&inner.control);
        if ctl.closed {
            return;
        }
        if p.needs_checkpoint(&inner, &ctl) {
            if let Err(e) = p.checkpoint(&inner, &mut ctl, Mode::Periodic) {
                log::warn!(
                    "bitmap write-out to {} failed (will retry): {e}",
                    describe(&ctl.store)
                );
            }
        }
    }
}

impl Persist {
    fn kick(&self) {
        lock(&self.wake).kick = true;
        self.wake_cv.notify_all();
    }

    fn extent_range(&self, offset: u64, len: u64) -> (u64, u64) {
        (
            offset >> self.extent_shift,
            (offset + len - 1) >> self.extent_shift,
        )
    }

    /// Makes the extents of `[offset, offset+len)` durable in the current log.
    fn log(&self, offset: u64, len: u64) -> Result<(), DirtyError> {
        // Pairs with the fence after the log switch in `checkpoint`.
        fence(Ordering::SeqCst);
        let al = self.al.load();
        match al.kind() {
            AL_LIVE => {}
            AL_NO_FILE => return Ok(()),
            AL_CLOSED => return Err(DirtyError::ShutDown),
            _ => return Err(failed_log()),
        }
        let (first, last) = self.extent_range(offset, len);
        let mut missing = false;
        for e in first..=last {
            if al.is_durable(e) {
                al.touch(e);
            } else {
                missing = true;
            }
        }
        if !missing {
            return Ok(());
        }
        let al = arc_swap::Guard::into_inner(al);
        self.commit(&al, first, last)
    }

    /// The slow path: request the extents and wait for a group commit.
    fn commit(&self, al: &Arc<AlEpoch>, first: u64, last: u64) -> Result<(), DirtyError> {
        let start = Instant::now();
        self.stats.log_waits.fetch_add(1, Ordering::Relaxed);
        for e in first..=last {
            al.request(e);
            al.touch(e);
        }
        let result = (|| {
            let mut committing = lock(&al.committing);
            loop {
                if al.retired.load(Ordering::Acquire) {
                    return Ok(());
                }
                match al.kind() {
                    AL_LIVE => {}
                    AL_CLOSED => return Err(DirtyError::ShutDown),
                    _ => return Err(failed_log()),
                }
                if (first..=last).all(|e| al.is_durable(e)) {
                    return Ok(());
                }
                if *committing {
                    committing = al.cv.wait(committing).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                *committing = true;
                drop(committing);
                let res = self.write_log(al);
                committing = lock(&al.committing);
                *committing = false;
                al.cv.notify_all();
                res?;
            }
        })();
        self.stats
            .log_wait_us
            .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        result
    }

    /// Writes every log page holding requested-but-not-durable bits, syncs,
    /// and publishes them as durable.
    fn write_log(&self, al: &AlEpoch) -> Result<(), DirtyError> {
        let _shared = self.layout_lock.read().unwrap_or_else(|e| e.into_inner());
        if al.retired.load(Ordering::Acquire) || al.kind() != AL_LIVE {
            return Ok(());
        }
        let Some(store) = &al.store else {
            return Err(failed_log());
        };
        let words_per_page = (PAGE / 8) as usize;
        let req = AlEpoch::snapshot(&al.requested);
        let mut pages = Vec::new();
        for (w, r) in req.iter().enumerate() {
            if r & !al.durable[w].load(Ordering::Acquire) != 0 {
                let p = w / words_per_page;
                if pages.last() != Some(&p) {
                    pages.push(p);
                }
            }
        }
        let what = || format!("writing the activity log of {}", store.describe());
        for &p in &pages {
            let words = &req[p * words_per_page..((p + 1) * words_per_page).min(req.len())];
            let mut buf = vec![0u8; PAGE as usize];
            for (i, w) in words.iter().enumerate() {
                buf[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            store
                .write_at(al.slot_off + PAGE + p as u64 * PAGE, &buf)
                .map_err(|e| DirtyError::io(what(), e))?;
        }
        store.sync().map_err(|e| DirtyError::io(what(), e))?;
        self.stats.log_commits.fetch_add(1, Ordering::Relaxed);
        for &p in &pages {
            let range = p * words_per_page..((p + 1) * words_per_page).min(req.len());
            for (d, r) in al.durable[range.clone()].iter().zip(&req[range]) {
                d.fetch_or(*r, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    fn needs_checkpoint(&self, inner: &Inner, ctl: &Control) -> bool {
        if ctl.layout.is_none() {
            return false;
        }
        let cur = self.al.load();
        ctl.durable_gen < cur.epoch
            || ctl.full_writeout
            || !cur.is_empty()
            || inner
                .bitmaps
                .load()
                .iter()
                .any(|b| b.persistent && b.bitmap.bits().has_changed_pages())
    }

    /// The persistent bitmaps of the current file, in file order.
    fn file_bitmaps(inner: &Inner, layout: &Layout) -> Vec<Option<Arc<Named>>> {
        let list = inner.bitmaps.load();
        layout
            .entries
            .iter()
            .map(|e| {
                list.iter()
                    .find(|b| b.persistent && b.name == e.name)
                    .cloned()
            })
            .collect()
    }

    /// Starts a new epoch and writes the fine level out (see the module docs).
    fn checkpoint(&self, inner: &Inner, ctl: &mut Control, mode: Mode) -> Result<(), DirtyError> {
        let res = self.checkpoint_inner(inner, ctl, mode);
        match &res {
            Ok(()) => self.stats.checkpoints.fetch_add(1, Ordering::Relaxed),
            Err(_) => self
                .stats
                .checkpoint_failures
                .fetch_add(1, Ordering::Relaxed),
        };
        res
    }

    fn checkpoint_inner(
        &self,
        inner: &Inner,
        ctl: &mut Control,
        mode: Mode,
    ) -> Result<(), DirtyError> {
        let (Some(layout), Some(store)) = (ctl.layout.clone(), ctl.store.clone()) else {
            return Ok(());
        };
        let cur = self.al.load_full();
        if cur.kind() != AL_LIVE {
            return Err(failed_log());
        }
        // A previous checkpoint switched epochs but did not make its state
        // durable: finish it first, so the log before `cur` may be retired.
        if ctl.durable_gen < cur.epoch {
            self.write_fine_and_state(inner, ctl, &store, &layout, cur.epoch, false)?;
        }
        if let Some(prev) = ctl.prev_al.take() {
            let _excl = self.layout_lock.write().unwrap_or_else(|e| e.into_inner());
            prev.retire();
        }
        let next_epoch = cur.epoch + 1;
        let next = if mode == Mode::Final {
            AlEpoch::new(next_epoch, None, 0, self.nwords, AL_CLOSED, &[], false)
        } else {
            let prepop = if mode == Mode::Periodic && self.carry_hot_extents {
                AlEpoch::snapshot(&cur.touched)
            } else {
                Vec::new()
            };
            let slot_off = layout.al_slot_off(next_epoch);
            let mut buf = layout.encode_al_header(next_epoch);
            let bits_len = (layout.al_len - PAGE) as usize;
            let start = buf.len();
            buf.resize(start + bits_len, 0);
            for (i, w) in prepop.iter().enumerate() {
                buf[start + i * 8..start + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            let what = || format!("starting log epoch {next_epoch} in {}", store.describe());
            store
                .write_at(slot_off, &buf)
                .map_err(|e| DirtyError::io(what(), e))?;
            store.sync().map_err(|e| DirtyError::io(what(), e))?;
            AlEpoch::new(
                next_epoch,
                Some(store.clone()),
                slot_off,
                self.nwords,
                AL_LIVE,
                &prepop,
                true,
            )
        };
        self.al.store(Arc::new(next));
        // Pairs with the fence in `log`: after this, a marker either sees the
        // new log or its fine bits are visible to the reads below.
        fence(Ordering::SeqCst);
        ctl.prev_al = Some(cur);
        self.write_fine_and_state(inner, ctl, &store, &layout, next_epoch, mode == Mode::Final)
    }

    fn write_fine_and_state(
        &self,
        inner: &Inner,
        ctl: &mut Control,
        store: &Arc<dyn MetaStore>,
        layout: &Layout,
        gen: u64,
        clean: bool,
    ) -> Result<(), DirtyError> {
        let what = || format!("writing bitmaps to {}", store.describe());
        let members = Self::file_bitmaps(inner, layout);
        let full = ctl.full_writeout;
        // From here until the state block is durable, a failure means the
        // changed-page marks we take are lost: force a full write next time.
        ctl.full_writeout = true;
        let words_per_page = (PAGE_BYTES / 8) as usize;
        let mut buf = vec![0u8; PAGE_BYTES as usize];
        for (e, b) in layout.entries.iter().zip(&members) {
            let Some(b) = b else { continue };
            if e.data_len == 0 {
                continue;
            }
            let pages = if full {
                b.bitmap.bits().take_changed_pages();
                (0..b.bitmap.bits().page_count()).collect()
            } else {
                b.bitmap.bits().take_changed_pages()
            };
            for p in pages {
                b.bitmap.bits().read_words_le(p * words_per_page, &mut buf);
                let off = p as u64 * PAGE_BYTES;
                let n = (e.data_len - off).min(PAGE_BYTES) as usize;
                store
                    .write_at(e.data_off + off, &buf[..n])
                    .map_err(|err| DirtyError::io(what(), err))?;
            }
        }
        store.sync().map_err(|err| DirtyError::io(what(), err))?;
        let flags: Vec<u64> = members
            .iter()
            .map(|b| match b {
                Some(b) if b.bitmap.is_recording() => BITMAP_RECORDING,
                _ => 0,
            })
            .collect();
        let state = layout.encode_state(gen, if clean { STATE_CLEAN } else { 0 }, &flags);
        store
            .write_at(layout.state_off_for(gen), &state)
            .map_err(|err| DirtyError::io(what(), err))?;
        store.sync().map_err(|err| DirtyError::io(what(), err))?;
        ctl.durable_gen = gen;
        ctl.full_writeout = false;
        Ok(())
    }

    /// Writes a whole new sidecar for `members` (persistent bitmaps, in
    /// order) into `store` and switches to it atomically; with no members,
    /// deletes the file in `store`. `store` is the current sidecar, or a new
    /// one ([`DirtyTracker::relocate`]): on success it becomes the current
    /// one; on failure nothing changes but the forced full write-out (the
    /// changed-page marks were consumed), and the old file stays in use.
    /// A replacement of the current file that took effect without being
    /// durable ([`super::store::took_effect`]) is a success: the store
    /// makes it durable before any later mark is (its next sync).
    ///
    /// With `staged` (a file staged by [`DirtyTracker::prepare_relocation`]
    /// for the same bitmaps), only what differs from it is written. With
    /// `fresh`, the new log starts empty instead of with the hot extents
    /// (after a clear: old extents must not come back at recovery).
    fn relayout(
        &self,
        inner: &Inner,
        ctl: &mut Control,
        members: &[Arc<Named>],
        store: &Arc<dyn MetaStore>,
        staged: Option<&Staged>,
        fresh: bool,
    ) -> Result<(), DirtyError> {
        let _excl = self.layout_lock.write().unwrap_or_else(|e| e.into_inner());
        let cur = self.al.load_full();
        let next_epoch = cur.epoch.max(ctl.durable_gen) + 1;
        let retire_old = |ctl: &mut Control| {
            cur.retire();
            if let Some(prev) = ctl.prev_al.take() {
                prev.retire();
            }
        };
        // A replacement of the file in use that took effect but is not
        // durable is adopted: reverting would leave the tracker writing to
        // an unlinked file while the path holds the new content. A new
        // sidecar elsewhere ([`DirtyTracker::relocate`]) is given up instead:
        // the old one is still intact at its own path.
        let in_use = ctl
            .store
            .as_ref()
            .is_some_and(|o| Arc::ptr_eq(o, store) || o.describe() == store.describe());
        let adopt = |e: std::io::Error, what: &str| {
            if in_use && took_effect(&e) {
                log::warn!("bitmap sidecar {}: {what}: {e}", store.describe());
                Ok(())
            } else {
                Err(e)
            }
        };
        if members.is_empty() {
            store
                .remove()
                .or_else(|e| adopt(e, "removed"))
                .map_err(|e| DirtyError::io(format!("removing {}", store.describe()), e))?;
            self.al.store(Arc::new(AlEpoch::new(
                next_epoch,
                None,
                0,
                self.nwords,
                AL_NO_FILE,
                &[],
                false,
            )));
            retire_old(ctl);
            ctl.store = Some(store.clone());
            ctl.layout = None;
            ctl.durable_gen = next_epoch;
            ctl.full_writeout = false;
            return Ok(());
        }
        let extent_size = 1u64 << self.extent_shift;
        let plan = plan_of(members);
        let staged = staged.filter(|st| st.plan == plan);
        let file_id = staged.map_or_else(new_file_id, |st| st.file_id);
        let layout = Layout::plan(file_id, inner.disk_size, extent_size, &plan);
        let prepop = if fresh { Vec::new() } else { self.prepop(&cur) };
        let slot_off = layout.al_slot_off(next_epoch);
        // Not durable until the new file is in place: markers wait (their
        // commits need the layout lock we hold).
        let next = Arc::new(AlEpoch::new(
            next_epoch,
            Some(store.clone()),
            slot_off,
            self.nwords,
            AL_LIVE,
            &prepop,
            false,
        ));
        self.al.store(next.clone());
        fence(Ordering::SeqCst);

        let file = build_file(&layout, members, next_epoch, &prepop, true);
        let written = match staged {
            Some(st) if st.bytes.len() == file.len() => {
                store.commit_staged(&file, &changed_pages(&st.bytes, &file))
            }
            _ => store.replace(&file),
        };
        match written.or_else(|e| adopt(e, "replaced")) {
            Ok(()) => {
                for (i, w) in prepop.iter().enumerate() {
                    next.durable[i].fetch_or(*w, Ordering::AcqRel);
                }
                retire_old(ctl);
                ctl.store = Some(store.clone());
                ctl.layout = Some(layout);
                ctl.durable_gen = next_epoch;
                ctl.full_writeout = false;
                Ok(())
            }
            Err(e) => {
                // The old file is still in place and `cur` still valid in it.
                next.set_kind(AL_FAILED);
                self.al.store(cur.clone());
                for b in members {
                    b.bitmap.bits().mark_all_pages_changed();
                }
                ctl.full_writeout = true;
                Err(DirtyError::io(format!("replacing {}", store.describe()), e))
            }
        }
    }
}

impl Persist {
    /// The hot extents of `cur` that a new log starts with.
    fn prepop(&self, cur: &AlEpoch) -> Vec<u64> {
        if cur.kind() == AL_LIVE && self.carry_hot_extents {
            AlEpoch::snapshot(&cur.touched)
        } else {
            Vec::new()
        }
    }
}

/// What decides a sidecar's layout: each persistent bitmap's name,
/// granularity and consistency, in order.
fn plan_of(members: &[Arc<Named>]) -> Vec<(String, u64, bool)> {
    members
        .iter()
        .map(|b| (b.name.clone(), b.bitmap.granularity(), b.inconsistent))
        .collect()
}

/// A complete sidecar of `members` whose current log is epoch `epoch`
/// holding `prepop`. With `take_changed`, each bitmap's changed-page marks
/// are consumed just before its bits are read (the file then holds every
/// change they stood for); without, they stay for the current sidecar's
/// next write-out.
fn build_file(
    layout: &Layout,
    members: &[Arc<Named>],
    epoch: u64,
    prepop: &[u64],
    take_changed: bool,
) -> Vec<u8> {
    let mut file = vec![0u8; layout.total_len as usize];
    let put = |file: &mut Vec<u8>, off: u64, bytes: &[u8]| {
        let off = off as usize;
        file[off..off + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut file, 0, &layout.encode_preamble());
    let flags: Vec<u64> = members
        .iter()
        .map(|b| {
            if b.bitmap.is_recording() {
                BITMAP_RECORDING
            } else {
                0
            }
        })
        .collect();
    put(
        &mut file,
        layout.state_off_for(epoch),
        &layout.encode_state(epoch, 0, &flags),
    );
    let slot_off = layout.al_slot_off(epoch);
    put(&mut file, slot_off, &layout.encode_al_header(epoch));
    let mut bits = Vec::with_capacity(prepop.len() * 8);
    for w in prepop {
        bits.extend_from_slice(&w.to_le_bytes());
    }
    put(&mut file, slot_off + PAGE, &bits);
    // The other slot: a valid header of epoch 0, which no state applies.
    put(
        &mut file,
        layout.al_slot_off(epoch + 1),
        &layout.encode_al_header(0),
    );
    for (e, b) in layout.entries.iter().zip(members) {
        if e.data_len == 0 {
            continue;
        }
        if take_changed {
            b.bitmap.bits().take_changed_pages();
        }
        let n = b.bitmap.bits().word_count() * 8;
        let off = e.data_off as usize;
        b.bitmap.bits().read_words_le(0, &mut file[off..off + n]);
    }
    file
}

/// The page-aligned byte ranges where `new` differs from `old` (same length).
fn changed_pages(old: &[u8], new: &[u8]) -> Vec<std::ops::Range<usize>> {
    let page = PAGE as usize;
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, (a, b)) in old.chunks(page).zip(new.chunks(page)).enumerate() {
        if a == b {
            continue;
        }
        let range = i * page..i * page + b.len();
        match out.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => out.push(range),
        }
    }
    out
}

/// A sidecar staged by [`DirtyTracker::prepare_relocation`] or a
/// transaction's prepare.
struct Staged {
    file_id: u64,
    plan: Vec<(String, u64, bool)>,
    /// What was staged.
    bytes: Vec<u8>,
}

/// A relocation whose new sidecar is written and synced under a temporary
/// name; finish it with [`DirtyTracker::relocate_prepared`]. Dropped
/// unfinished (the pivot was given up), it removes the staged file.
pub struct PreparedRelocation {
    store: Arc<dyn MetaStore>,
    staged: Option<Staged>,
}

impl Drop for PreparedRelocation {
    fn drop(&mut self) {
        // A no-op once the staged file was put in place.
        self.store.discard_staged();
    }
}

/// A sidecar's name for log lines.
fn describe(store: &Option<Arc<dyn MetaStore>>) -> String {
    store
        .as_ref()
        .map_or_else(|| "(no sidecar)".to_string(), |s| s.describe())
}

fn failed_log() -> DirtyError {
    DirtyError::io(
        "activity log",
        std::io::Error::other("a sidecar update failed; marks cannot be made durable"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::MemStore;

    const MIB: u64 = 1 << 20;

    fn tracker(store: &Arc<MemStore>, size: u64) -> DirtyTracker {
        let mut cfg = TrackerConfig::new(size);
        cfg.sidecar = Some(store.clone());
        cfg.extent_size = MIB;
        cfg.flush_interval = Duration::from_secs(3600);
        DirtyTracker::open(cfg).unwrap()
    }

    #[test]
    fn management_errors_use_qemu_wording() {
        let t = DirtyTracker::open(TrackerConfig::new(64 * MIB)).unwrap();
        t.add("b0", None, false, false).unwrap();
        let msg = |r: Result<(), DirtyError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(t.add("b0", None, false, false)),
            "Bitmap already exists: b0"
        );
        assert_eq!(
            msg(t.add("", None, false, false)),
            "Bitmap name cannot be empty"
        );
        assert_eq!(
            msg(t.add("g", Some(256), false, false)),
            "Granularity must be power of 2 and at least 512"
        );
        let long = "x".repeat(1024);
        assert_eq!(
            msg(t.add(&long, None, false, false)),
            format!("Bitmap name too long: {long}")
        );
        assert!(t.add(&"y".repeat(1023), None, false, false).is_ok());
        assert_eq!(msg(t.clear("nope")), "Dirty bitmap 'nope' not found");
        assert_eq!(msg(t.merge("b0", &["zz"])), "Dirty bitmap 'zz' not found");
        assert!(matches!(
            t.add("p", None, true, false),
            Err(DirtyError::PersistenceUnavailable(_))
        ));
        t.set_busy("b0", true).unwrap();
        assert_eq!(
            msg(t.clear("b0")),
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
        );
        assert!(t.remove("b0").is_err());
        t.set_busy("b0", false).unwrap();
        t.remove("b0").unwrap();
        assert_eq!(t.list().len(), 1);
    }

    #[test]
    fn marks_counts_merge_enable_disable() {
        let t = DirtyTracker::open(TrackerConfig::new(16 * MIB + 512)).unwrap();
        t.add("a", Some(65536), false, false).unwrap();
        t.add("fine", Some(512), false, false).unwrap();
        t.add("off", None, false, true).unwrap();
        t.mark(16 * MIB, 512).unwrap();
        t.mark(4096, 4096).unwrap();
        let info = |n: &str| t.list().into_iter().find(|b| b.name == n).unwrap();
        assert_eq!(info("a").count, 2 * 65536);
        assert_eq!(info("fine").count, 4096 + 512);
        assert_eq!(info("off").count, 0);
        assert!(!info("off").recording);
        t.enable("off").unwrap();
        t.mark(0, 1).unwrap();
        assert_eq!(info("off").count, 65536);
        // "fine" has 4 KiB..8 KiB (chunk 0 of "off", already set) and the
        // last 512 bytes (chunk 256 of "off").
        t.merge("off", &["fine"]).unwrap();
        assert_eq!(info("off").count, 2 * 65536);
        t.disable("a").unwrap();
        t.mark(8 * MIB, 1).unwrap();
        assert_eq!(info("a").count, 2 * 65536);
        t.clear("fine").unwrap();
        assert_eq!(info("fine").count, 0);
        // Newest first.
        let names: Vec<_> = t.list().into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["off", "fine", "a"]);
    }

    #[test]
    fn persistent_bitmap_survives_clean_and_unclean_stops() {
        let store = Arc::new(MemStore::new());
        let size = 64 * MIB;
        {
            let t = tracker(&store, size);
            t.add("p", Some(65536), true, false).unwrap();
            t.add("v", Some(65536), false, false).unwrap();
            t.mark(5 * MIB + 7, 100).unwrap();
            t.shutdown().unwrap();
            assert!(matches!(t.mark(0, 1), Err(DirtyError::ShutDown)));
        }
        {
            let t = tracker(&store, size);
            let list = t.list();
            assert_eq!(list.len(), 1, "volatile bitmaps do not survive");
            assert_eq!(list[0].count, 65536, "clean stop: no over-marking");
            assert!(t.stats().recovered_clean);
            t.mark(30 * MIB, 1).unwrap();
            // Dropped without shutdown: like kill -9.
        }
        {
            let t = tracker(&store, size);
            let b = t.bitmap("p").unwrap();
            assert!(b.get(5 * MIB) && b.get(30 * MIB));
            // Over-marking is bounded by the 1 MiB extent that was logged.
            assert!(b.dirty_chunks() <= 1 + 16, "{}", b.dirty_chunks());
            assert!(!t.stats().recovered_clean);
            t.clear("p").unwrap();
        }
        {
            let t = tracker(&store, size);
            assert_eq!(t.list()[0].count, 0, "a durable clear stays cleared");
            t.remove("p").unwrap();
        }
        assert!(
            store.contents().is_none(),
            "no persistent bitmap: no sidecar"
        );
    }

    #[test]
    fn hot_extents_need_no_commit_after_checkpoint() {
        let store = Arc::new(MemStore::new());
        let t = tracker(&store, 64 * MIB);
        t.add("p", None, true, false).unwrap();
        t.mark(0, 4096).unwrap();
        let s1 = t.stats();
        assert_eq!(s1.log_commits, 1);
        t.mark(8192, 4096).unwrap();
        assert_eq!(t.stats().log_commits, 1, "same extent: hot path");
        t.checkpoint_now().unwrap();
        t.mark(12288, 4096).unwrap();
        assert_eq!(
            t.stats().log_commits,
            1,
            "extent carried into the next epoch"
        );
        t.checkpoint_now().unwrap();
        t.checkpoint_now().unwrap();
        // Untouched for a whole epoch: dropped from the log, logged again.
        t.mark(0, 1).unwrap();
        assert_eq!(t.stats().log_commits, 2);
    }

    #[test]
    fn disabled_persistent_bitmap_is_not_overmarked() {
        let store = Arc::new(MemStore::new());
        {
            let t = tracker(&store, 64 * MIB);
            t.add("on", None, true, false).unwrap();
            t.add("off", None, true, true).unwrap();
            t.mark(MIB, 1).unwrap();
        }
        let t = tracker(&store, 64 * MIB);
        let info: Vec<_> = t.list();
        let off = info.iter().find(|b| b.name == "off").unwrap();
        assert_eq!(off.count, 0);
        assert!(!off.recording);
        let on = info.iter().find(|b| b.name == "on").unwrap();
        assert!(on.count >= 65536 && on.recording);
    }

    #[test]
    fn damaged_sidecar_loads_inconsistent() {
        let store = Arc::new(MemStore::new());
        {
            let t = tracker(&store, 64 * MIB);
            t.add("p", None, true, false).unwrap();
            t.shutdown().unwrap();
        }
        let mut bytes = store.contents().unwrap();
        let len = bytes.len();
        bytes.truncate(len - 4096);
        store.set_contents(Some(bytes));
        let t = tracker(&store, 64 * MIB);
        let info = t.list();
        assert!(info[0].inconsistent && !info[0].recording);
        assert_eq!(
            t.clear("p").unwrap_err().to_string(),
            "Bitmap 'p' is inconsistent and cannot be used"
        );
        assert!(t.enable("p").is_err());
        t.mark(0, 4096).unwrap();
        drop(t);
        // Stays inconsistent across restarts until removed.
        let t = tracker(&store, 64 * MIB);
        assert!(t.list()[0].inconsistent);
        t.remove("p").unwrap();
        assert!(t.list().is_empty());
    }
}

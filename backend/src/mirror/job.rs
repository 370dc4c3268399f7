//! The mirror job driver: what happens between `blockdev-mirror` and the
//! end of the job.
//!
//! - `run`: builds the dirty bitmap for the sync mode (or takes it from the
//!   persistent state when resuming), copies until nothing is dirty, flushes
//!   the target and announces READY; then keeps copying what the guest
//!   dirties. Once `complete` (or a soft cancel) arrives it copies until
//!   little is dirty and returns.
//! - `commit` (finalize): prepares everything it can with guest I/O
//!   running (copies until little is dirty, flushes the target, runs the
//!   pivot hooks' preparation, e.g. the bitmap sidecar written and synced
//!   under a temporary name); then, with guest I/O paused at the disk's
//!   gate, copies what is still dirty, flushes the target if that copy
//!   wrote anything, and, for `complete`, runs the hooks' commits and swaps
//!   the disk's image for the target (the pivot); a soft cancel stops
//!   there, so the target is a point-in-time copy. The filter node
//!   (`mirror_top`, whose hook marks guest writes) leaves the guest's path
//!   and the graph under the same pause, the sidecar deleted, the source closed. The
//!   pause is bounded (see [`PAUSE_REACH_TIMEOUT`], [`PIVOT_ATTEMPTS`]).
//! - `abort` (error or forced cancel): stops copying, removes the filter node; the
//!   source is untouched and the guest carries on with it.
//! - errors follow `on-source-error` / `on-target-error` (report, ignore,
//!   stop, enospc); a failing target never fails a guest request.

use super::engine::Engine;
use super::hook::MirrorState;
use super::top::MirrorTop;
use super::{strerror, CopyMode, MirrorConfig, SyncMode};
use crate::gate::PauseGuard;
use crate::jobs::{ErrorAction, IoOperation, JobContext, JobDriver, JobError};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `complete` pauses the guest for the last copy once what is dirty can be
/// copied in about this long (at the copy throughput measured so far).
pub const PIVOT_PAUSE_BUDGET: Duration = Duration::from_millis(1);
/// ... but never waits for less dirty data than this.
pub const PIVOT_DIRTY_MIN: u64 = 256 << 10;
/// How long `complete` tries to get there while the guest keeps writing,
/// before it pauses the guest anyway.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(5);
/// After this long without converging, a background mirror that is
/// completing switches to write-blocking (see `run_loop`).
pub const SWITCH_TO_ACTIVE_AFTER: Duration = Duration::from_secs(1);

/// Dirty bytes small enough to copy with guest I/O paused.
fn pivot_dirty_target(engine: &Engine) -> u64 {
    let by_rate = engine
        .throughput()
        .map(|bps| (bps * PIVOT_PAUSE_BUDGET.as_secs_f64()) as u64)
        .unwrap_or(0);
    by_rate.clamp(PIVOT_DIRTY_MIN, 64 << 20)
}
/// How long a pause (pivot, checkpoint) waits for the guest requests in
/// flight before it gives up and lets I/O go on (the guest's other queues
/// wait meanwhile): a request stuck in slow storage must not freeze the
/// disk. The pivot then copies more and tries again; a checkpoint is
/// skipped (P stays a superset of D).
pub const PAUSE_REACH_TIMEOUT: Duration = Duration::from_millis(100);
/// Pauses a pivot reaches before it takes whatever it gets: the last one
/// copies whatever is dirty (by then in write-blocking mode, so little).
pub const PIVOT_ATTEMPTS: u32 = 5;

/// Longest wait between two attempts to reach the pivot's pause (the wait
/// doubles from [`PAUSE_REACH_TIMEOUT`] while a request holds it off).
pub const PAUSE_RETRY_MAX: Duration = Duration::from_secs(2);

/// Flushes of the target before the pivot's pause at most (see
/// `flush_before_pause`).
const PRE_PAUSE_FLUSHES: usize = 4;
/// A flush this quick leaves little for the one under the pause.
const QUICK_FLUSH: Duration = Duration::from_millis(5);

/// Dirty bytes the pivot accepts to copy with guest I/O paused: a few
/// times the target it converged to, so a burst of guest writes between
/// the convergence and the pause does not cancel the attempt, while a
/// guest that dirties faster than the copier does.
fn pivot_pause_bound(engine: &Engine) -> u64 {
    pivot_dirty_target(engine).saturating_mul(4)
}

/// Back-off before retrying after an error with `ignore`.
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// Timings of one mirror, for logs, tests and the benchmark.
#[derive(Debug, Clone, Default)]
pub struct MirrorStats {
    /// From the start of `run` to READY.
    pub time_to_ready: Option<Duration>,
    /// Data bytes copied (holes excluded).
    pub data_bytes: u64,
    /// How long guest I/O was paused for the final copy and the pivot.
    pub pivot_pause: Option<Duration>,
    /// Bytes copied while guest I/O was paused.
    pub pivot_bytes: u64,
    /// Pauses tried for the final copy (1 unless the guest dirtied too much
    /// or a request held the pause off).
    pub pivot_attempts: u32,
}

/// A pivot hook's work under the pause, prepared before it. Dropped
/// uncalled, the pivot was given up: it undoes what its preparation left.
pub type PivotCommit = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// Called before a pivot, with guest I/O running, with the old and the new
/// image path: prepares what follows the disk to its new image (the daemon
/// writes the persistent bitmaps' new sidecar) and returns what is left to
/// do with guest I/O paused, just before the switch.
pub type PivotHook =
    Arc<dyn Fn(&std::path::Path, &std::path::Path) -> Result<PivotCommit, String> + Send + Sync>;

/// Keeps the target in sync while a manually finalized job waits in
/// `pending`.
struct KeepSync {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Engine>,
}

/// The mirror's [`JobDriver`].
pub struct MirrorJob {
    state: Arc<MirrorState>,
    top: Arc<MirrorTop>,
    config: MirrorConfig,
    engine: Mutex<Option<Engine>>,
    keep_sync: Mutex<Option<KeepSync>>,
    on_end: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    on_pivot: PivotHook,
    stats: Mutex<MirrorStats>,
    ready: AtomicBool,
}

impl std::fmt::Debug for MirrorJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorJob")
            .field("state", &self.state)
            .field("config", &self.config)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MirrorJob {
    /// A driver over `state` whose filter node `top` is in the guest's
    /// path; `on_end` runs once when the job is over (the manager frees
    /// the disk's mirror slot). The job's end takes `top` out of the
    /// guest's path and the graph.
    pub fn new(
        state: Arc<MirrorState>,
        top: Arc<MirrorTop>,
        config: MirrorConfig,
        engine: Engine,
        on_end: Box<dyn FnOnce() + Send>,
        on_pivot: PivotHook,
    ) -> MirrorJob {
        MirrorJob {
            state,
            top,
            config,
            engine: Mutex::new(Some(engine)),
            keep_sync: Mutex::new(None),
            on_end: Mutex::new(Some(on_end)),
            on_pivot,
            stats: Mutex::new(MirrorStats::default()),
            ready: AtomicBool::new(false),
        }
    }

    /// The shared state (tests inspect the bitmaps).
    pub fn state(&self) -> &Arc<MirrorState> {
        &self.state
    }

    /// Timings so far.
    pub fn stats(&self) -> MirrorStats {
        lock(&self.stats).clone()
    }

    fn take_engine(&self) -> Option<Engine> {
        if let Some(k) = lock(&self.keep_sync).take() {
            k.stop.store(true, Ordering::SeqCst);
            match k.thread.join() {
                Ok(engine) => return Some(engine),
                Err(_) => log::error!("mirror keep-sync thread panicked"),
            }
        }
        lock(&self.engine).take()
    }

    fn run_loop(&self, ctx: &JobContext, engine: &mut Engine) -> Result<(), String> {
        let s = &*self.state;
        let started = Instant::now();
        if !self.config.resumed {
            match self.config.sync {
                SyncMode::Full | SyncMode::Top => s.dirty.set_all(),
                SyncMode::None => {}
            }
        }
        engine.checkpoint(0);
        ctx.progress_set_remaining(s.dirty_bytes());
        log::info!(
            "mirror '{}': {} to {}: {} bytes to copy",
            ctx.id(),
            self.config.sync.as_str(),
            s.target.path().display(),
            s.dirty_bytes()
        );
        let mut retry_at: Option<Instant> = None;
        let mut converge_since: Option<Instant> = None;
        loop {
            let speed = ctx.speed();
            // Errors of write-blocking guest writes, then of copies.
            if let Some(errno) = s.take_wb_error() {
                match ctx.error_action(self.config.on_target_error, IoOperation::Write, errno) {
                    ErrorAction::Report => {
                        engine.drain(speed);
                        return Err(strerror(errno));
                    }
                    ErrorAction::Ignore => retry_at = Some(Instant::now() + RETRY_DELAY),
                    ErrorAction::Stop => {}
                }
            }
            for e in engine.take_errors() {
                let policy = match e.op {
                    IoOperation::Read => self.config.on_source_error,
                    IoOperation::Write => self.config.on_target_error,
                };
                match ctx.error_action(policy, e.op, e.errno) {
                    ErrorAction::Report => {
                        engine.drain(speed);
                        return Err(e.message);
                    }
                    ErrorAction::Ignore => retry_at = Some(Instant::now() + RETRY_DELAY),
                    ErrorAction::Stop => {}
                }
            }
            if ctx.should_pause() {
                if !engine.idle() {
                    // Finish what is in flight first; its errors count too.
                    engine.drain(speed);
                    continue;
                }
                // Record the progress so far: a paused mirror is a likely
                // moment for a daemon restart.
                engine.checkpoint(speed);
                ctx.pause_point();
                s.clear_wb_suspension();
                retry_at = None;
                continue;
            }
            if ctx.is_cancelled() {
                engine.drain(speed);
                return Ok(());
            }
            ctx.progress_update(engine.take_done_bytes());
            ctx.progress_set_remaining(s.dirty_bytes());
            let ready = self.ready.load(Ordering::SeqCst);
            if ready && (ctx.should_complete() || ctx.cancel_requested()) {
                let since = *converge_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= SWITCH_TO_ACTIVE_AFTER
                    && s.copy_mode() == CopyMode::Background
                {
                    // The guest dirties chunks as fast as they are copied:
                    // let its writes reach the target directly from now on,
                    // so what is dirty can only shrink, and the pause at the
                    // pivot stays short.
                    log::info!(
                        "mirror '{}': {} bytes still dirty after {:?} under guest writes; finishing in write-blocking mode",
                        ctx.id(),
                        s.dirty_bytes(),
                        since.elapsed()
                    );
                    s.set_write_blocking();
                }
                if s.dirty_bytes() <= pivot_dirty_target(engine)
                    || since.elapsed() >= CONVERGE_TIMEOUT
                {
                    engine.drain(speed);
                    ctx.progress_update(engine.take_done_bytes());
                    return Ok(());
                }
            }
            if engine.idle() && s.dirty.count() == 0 && retry_at.is_none() {
                if !ready {
                    if let Err(e) = s.target.flush() {
                        let errno = super::image_errno(&e);
                        match ctx.error_action(
                            self.config.on_target_error,
                            IoOperation::Write,
                            errno,
                        ) {
                            ErrorAction::Report => return Err(strerror(errno)),
                            ErrorAction::Ignore => retry_at = Some(Instant::now() + RETRY_DELAY),
                            ErrorAction::Stop => {}
                        }
                        continue;
                    }
                    engine.checkpoint(speed);
                    if s.dirty.count() == 0 {
                        self.ready.store(true, Ordering::SeqCst);
                        let took = started.elapsed();
                        lock(&self.stats).time_to_ready = Some(took);
                        log::info!("mirror '{}': ready after {took:?}", ctx.id());
                        ctx.transition_to_ready();
                    }
                }
                if self.ready.load(Ordering::SeqCst) && s.copy_mode() == CopyMode::WriteBlocking {
                    s.set_actively_synced();
                }
            }
            if engine.checkpoint_due() {
                engine.checkpoint(speed);
            }
            let can_copy = retry_at.is_none_or(|t| Instant::now() >= t);
            if can_copy {
                if retry_at.take().is_some() {
                    s.clear_wb_suspension();
                }
                engine.dispatch(speed);
            }
            if !engine.idle() {
                engine.collect(Duration::from_millis(10), speed);
            } else if let Some(d) = engine.rate_delay(speed) {
                ctx.sleep(d.min(Duration::from_millis(100)));
            } else if let Some(t) = retry_at {
                ctx.sleep(t.saturating_duration_since(Instant::now()));
            } else if s.dirty.count() == 0 {
                // Idle: a guest write wakes us at once; management actions
                // are noticed within the time-out.
                ctx.set_busy(false);
                s.wait_for_work(Duration::from_millis(10));
                ctx.set_busy(true);
            }
        }
    }

    /// Copies (with guest I/O running) until little is dirty. `run` has
    /// converged already unless finalization was manual, so this is short.
    fn converge(&self, engine: &mut Engine) -> Result<(), String> {
        let s = &*self.state;
        let t0 = Instant::now();
        while s.dirty_bytes() > pivot_dirty_target(engine) && t0.elapsed() < Duration::from_secs(1)
        {
            engine.dispatch(0);
            if engine.idle() {
                s.wait_for_work(Duration::from_millis(1));
            }
            engine.collect(Duration::from_millis(10), 0);
            if let Some(e) = engine.take_errors().into_iter().next() {
                engine.drain(0);
                return Err(e.message);
            }
        }
        engine.drain(0);
        match engine.take_errors().into_iter().next() {
            Some(e) => Err(e.message),
            None => Ok(()),
        }
    }

    /// Pauses guest I/O for the final copy, once little is dirty and the
    /// target is flushed: returns the pause, when it began, and the number
    /// of attempts. An attempt is given up (I/O resumes at once) if the
    /// requests in flight do not finish within [`PAUSE_REACH_TIMEOUT`] or
    /// if more than [`pivot_pause_bound`] is dirty once paused; then the
    /// mirror switches to write-blocking (so the guest's writes can no
    /// longer outrun the copy), copies more and tries again. The last of
    /// [`PIVOT_ATTEMPTS`] pauses that were reached takes whatever is dirty;
    /// a pause that cannot be reached is tried again, for as long as a
    /// request holds it off, but never holds I/O for more than
    /// [`PAUSE_REACH_TIMEOUT`] at a time.
    fn pause_for_pivot<'a>(
        &'a self,
        ctx: &JobContext,
        engine: &mut Engine,
    ) -> Result<(PauseGuard<'a>, Instant, u32), String> {
        let s = &*self.state;
        let gate = s.disk.gate();
        let mut attempt = 0;
        let mut backoff = PAUSE_REACH_TIMEOUT;
        loop {
            let last = attempt + 1 >= PIVOT_ATTEMPTS;
            self.converge(engine)?;
            self.flush_before_pause()?;
            let paused_at = Instant::now();
            let Some(pause) = gate.pause_timeout(PAUSE_REACH_TIMEOUT) else {
                log::info!(
                    "mirror '{}': guest requests still in flight after {PAUSE_REACH_TIMEOUT:?}; pausing again in {backoff:?}",
                    ctx.id()
                );
                // A request stuck in storage must not hold the other
                // queues back again and again: they run between attempts.
                ctx.sleep(backoff);
                backoff = (backoff * 2).min(PAUSE_RETRY_MAX);
                continue;
            };
            attempt += 1;
            let dirty = s.dirty_bytes();
            if last || dirty <= pivot_pause_bound(engine) {
                return Ok((pause, paused_at, attempt));
            }
            drop(pause);
            log::info!(
                "mirror '{}': {dirty} bytes dirty at the pause, more than {}; copying more{}",
                ctx.id(),
                pivot_pause_bound(engine),
                if s.copy_mode() == CopyMode::Background {
                    " in write-blocking mode"
                } else {
                    ""
                }
            );
            s.set_write_blocking();
        }
    }

    /// Flushes the target before the pause, so that the flush under it
    /// has little left to do. In write-blocking mode the guest's writes
    /// reach the target during a flush: flush again while flushes take
    /// long and get shorter, at most [`PRE_PAUSE_FLUSHES`] times. (In
    /// background mode nothing writes the target once the copies are
    /// drained; another flush would only let the guest dirty more chunks
    /// for the pause to copy.)
    fn flush_before_pause(&self) -> Result<(), String> {
        let s = &*self.state;
        let mut previous: Option<Duration> = None;
        for _ in 0..PRE_PAUSE_FLUSHES {
            let t = Instant::now();
            s.target
                .flush()
                .map_err(|e| strerror(super::image_errno(&e)))?;
            let took = t.elapsed();
            if s.copy_mode() == CopyMode::Background
                || took <= QUICK_FLUSH
                || previous.is_some_and(|p| took * 2 > p)
            {
                break;
            }
            previous = Some(took);
        }
        Ok(())
    }

    fn remove_state_file(&self) {
        if let Some(p) = &self.state.persist {
            if let Err(e) = std::fs::remove_file(p.path()) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}: {e}", p.path().display());
                }
            }
        }
    }
}

fn keep_sync_loop(mut engine: Engine, stop: Arc<AtomicBool>) -> Engine {
    while !stop.load(Ordering::SeqCst) {
        engine.dispatch(0);
        if engine.idle() {
            std::thread::sleep(Duration::from_millis(10));
        } else {
            engine.collect(Duration::from_millis(10), 0);
        }
        for e in engine.take_errors() {
            // Chunks stay dirty; finalize retries them (and fails on them).
            log::warn!("mirror: copy while pending failed: {}", e.message);
            std::thread::sleep(RETRY_DELAY);
        }
    }
    engine.drain(0);
    engine
}

impl JobDriver for MirrorJob {
    fn job_type(&self) -> &'static str {
        "mirror"
    }

    fn run(&self, ctx: &JobContext) -> Result<(), String> {
        let Some(mut engine) = lock(&self.engine).take() else {
            return Err("mirror engine missing".into());
        };
        let result = self.run_loop(ctx, &mut engine);
        let completing = result.is_ok() && !ctx.is_cancelled();
        if completing && !self.config.auto_finalize {
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            match std::thread::Builder::new()
                .name(format!("mirror-sync-{}", ctx.id()))
                .spawn(move || {
                    crate::thread_kind::started(crate::thread_kind::ThreadKind::Job);
                    keep_sync_loop(engine, stop2)
                }) {
                Ok(thread) => *lock(&self.keep_sync) = Some(KeepSync { stop, thread }),
                Err(e) => return Err(format!("cannot start the keep-sync thread: {e}")),
            }
        } else {
            *lock(&self.engine) = Some(engine);
        }
        result
    }

    fn complete(&self, _ctx: &JobContext) -> Result<(), JobError> {
        Ok(())
    }

    fn cancel(&self, force: bool, ready: bool) -> bool {
        // Before READY any cancel is a forced one (QEMU's mirror_cancel).
        force || !ready
    }

    fn commit(&self, ctx: &JobContext) -> Result<(), String> {
        let s = &*self.state;
        let pivot = ctx.should_complete();
        let Some(mut engine) = self.take_engine() else {
            return Err("mirror engine missing".into());
        };
        // Everything that can be done with guest I/O running is done first.
        let prepared = if pivot {
            let old_path = s.disk.image().path().to_path_buf();
            match (self.on_pivot)(&old_path, s.target.path()) {
                Ok(c) => Some(c),
                Err(e) => {
                    *lock(&self.engine) = Some(engine);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let (pause, paused_at, attempts) = match self.pause_for_pivot(ctx, &mut engine) {
            Ok(p) => p,
            Err(e) => {
                *lock(&self.engine) = Some(engine);
                return Err(e);
            }
        };
        let dirty_at_pause = s.dirty_bytes();
        // The target was flushed just before the pause; only what reached
        // it since needs flushing now: the chunks copied under the pause,
        // and in write-blocking mode the guest writes in between. It must be
        // durable before the guest runs on the target (a write the guest
        // flushed on the source must not be lost by a power cut after the
        // switch), hence here, under the pause.
        let unflushed = dirty_at_pause > 0 || s.copy_mode() == CopyMode::WriteBlocking;
        let mut result = engine.sync_all().map_err(|e| e.message);
        if result.is_ok() && unflushed {
            result = s
                .target
                .flush()
                .map_err(|e| strerror(super::image_errno(&e)));
        }
        if let (Ok(()), Some(commit)) = (&result, prepared) {
            // Still paused: whatever follows the disk to its new image (the
            // persistent bitmaps' sidecar) moves now, or the pivot fails and
            // the guest stays on the source.
            result = commit();
        }
        if let Err(e) = result {
            drop(pause);
            *lock(&self.engine) = Some(engine);
            return Err(e);
        }
        // The filter leaves the guest's path and the graph under the pause
        // (after a pivot the graph shows the target as the disk's node).
        self.top.leave();
        let old = pivot.then(|| s.disk.replace_image(Box::new(s.target.clone())));
        if !pivot {
            s.target.unlock();
        }
        drop(pause);
        let stall = paused_at.elapsed();
        {
            let mut st = lock(&self.stats);
            st.pivot_pause = Some(stall);
            st.pivot_bytes = dirty_at_pause;
            st.pivot_attempts = attempts;
            st.data_bytes = engine.data_bytes;
        }
        ctx.progress_update(engine.take_done_bytes());
        log::info!(
            "mirror '{}': {} after a {stall:?} pause ({dirty_at_pause} bytes copied while paused, attempt {attempts})",
            ctx.id(),
            if pivot {
                format!("switched to {}", s.target.path().display())
            } else {
                "stopped; the target is a point-in-time copy".to_string()
            }
        );
        drop(engine);
        self.remove_state_file();
        // The source image closes when the last reference goes (now, unless
        // a request that began before the pause still holds it).
        drop(old);
        Ok(())
    }

    fn abort(&self, ctx: &JobContext) {
        if let Some(mut engine) = self.take_engine() {
            engine.shutdown();
        }
        self.top.leave();
        self.state.target.unlock();
        self.remove_state_file();
        log::info!("mirror '{}': stopped without switching", ctx.id());
    }

    fn clean(&self, _ctx: &JobContext) {
        drop(self.take_engine());
        // A job that failed before it ran (or whose commit failed) still
        // had its filter node.
        self.top.leave();
        if let Some(f) = lock(&self.on_end).take() {
            f();
        }
    }

    fn change(&self, _ctx: &JobContext, options: &Map<String, Value>) -> Result<(), JobError> {
        let mode = match options.get("copy-mode") {
            None => return Err(JobError::Generic("Parameter 'copy-mode' is missing".into())),
            Some(v) => crate::qmp::args::value_enum(
                "copy-mode",
                v.clone(),
                &["background", "write-blocking"],
            )
            .map_err(|e| JobError::Generic(e.desc))?,
        };
        let current = self.state.copy_mode();
        if mode == current.as_str() {
            return Ok(());
        }
        if mode != CopyMode::WriteBlocking.as_str() {
            return Err(JobError::Generic(format!(
                "Change to copy mode '{mode}' is not implemented"
            )));
        }
        self.state.set_write_blocking();
        log::info!("mirror: copy mode is now write-blocking");
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn query_extra(&self, _ctx: &JobContext) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            "actively-synced".into(),
            json!(self.state.actively_synced.load(Ordering::SeqCst)),
        );
        m
    }
}

//! The kinds of threads the block layer starts, and one start-up hook the
//! binary registers to confine each of them (its seccomp policy lives in
//! vhost-glue; this crate only says which kind of thread is starting).

use std::sync::OnceLock;

/// What a thread started by the block layer does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// QMP: the accept loop, one reader per client, their writers.
    Qmp,
    /// Block jobs: job threads, mirror copy and sync threads, backup
    /// copy-before-write copiers.
    Job,
    /// The persistent dirty bitmaps' write-out thread.
    BitmapWriter,
    /// The NBD server: accept loop, per-connection readers and workers.
    Nbd,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Registers the function every thread of the block layer calls first;
/// false if one was registered already (the first one stays).
pub fn set_start_hook(hook: fn(ThreadKind)) -> bool {
    HOOK.set(hook).is_ok()
}

/// Called by a new thread of kind `kind` before it does anything else.
pub fn started(kind: ThreadKind) {
    if let Some(hook) = HOOK.get() {
        hook(kind);
    }
}

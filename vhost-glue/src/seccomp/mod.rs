//! seccomp self-confinement: one BPF allow-list per kind of thread
//! (`--seccomp`). Each thread installs its kind's filter as it starts;
//! threads it starts later inherit it and add their own, and stacked
//! filters only ever narrow, so a kind that starts threads of other kinds
//! allows their calls too (`Kind::children`).
//!
//! A denied call in the default mode (`trap`) raises SIGSYS; the handler
//! writes the thread and the call's number to stderr and dies of SIGSYS,
//! so a test or an operator sees the offender at once.

mod rules;

use seccompiler::{apply_filter, BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use vubd_backend::thread_kind::ThreadKind;

/// What a call outside a thread's allow-list does (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The kernel kills the process at once (SIGSYS, no message).
    Kill,
    /// SIGSYS: vubd names the thread and the call, then dies of SIGSYS.
    Trap,
    /// Allowed, but logged by the kernel (audit log): for diagnosis.
    Log,
    /// No filters.
    None,
}

/// The kinds of vubd's threads, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The vhost-user message handler (the main thread), the signal and
    /// shutdown threads.
    Main,
    /// Queue workers (vhost-user-backend's epoll threads).
    Queue,
    /// QMP accept, client and writer threads.
    Qmp,
    /// Block jobs: mirror, backup, copy-before-write copiers.
    Job,
    /// The dirty bitmaps' write-out thread.
    BitmapWriter,
    /// NBD server threads.
    Nbd,
}

const KINDS: [Kind; 6] = [
    Kind::Main,
    Kind::Queue,
    Kind::Qmp,
    Kind::Job,
    Kind::BitmapWriter,
    Kind::Nbd,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::Queue => "queue",
            Kind::Qmp => "qmp",
            Kind::Job => "job",
            Kind::BitmapWriter => "bitmap-writer",
            Kind::Nbd => "nbd",
        }
    }

    /// Kinds of threads a thread of this kind may start: they inherit its
    /// filter, so it must allow what they need.
    fn children(self) -> &'static [Kind] {
        match self {
            // vhost-user-backend starts the queue threads from the handler.
            Kind::Main => &[Kind::Queue],
            // Copiers a guest write starts under a copy-before-write filter
            // keep the queue's rules: they only copy between open images.
            Kind::Queue => &[],
            // Commands start jobs and the NBD server.
            Kind::Qmp => &[Kind::Job, Kind::Nbd],
            // A job's pivot moves the bitmaps and restarts their writer.
            Kind::Job => &[Kind::BitmapWriter],
            Kind::BitmapWriter | Kind::Nbd => &[],
        }
    }

    /// This kind's rules with those of every kind it may start.
    fn rules(self) -> rules::Rules {
        let mut all = rules::Rules::new();
        let mut todo = vec![self];
        let mut seen = Vec::new();
        while let Some(k) = todo.pop() {
            if seen.contains(&k) {
                continue;
            }
            seen.push(k);
            rules::add_own(k, &mut all);
            todo.extend_from_slice(k.children());
        }
        all
    }
}

impl From<ThreadKind> for Kind {
    fn from(k: ThreadKind) -> Self {
        match k {
            ThreadKind::Qmp => Kind::Qmp,
            ThreadKind::Job => Kind::Job,
            ThreadKind::BitmapWriter => Kind::BitmapWriter,
            ThreadKind::Nbd => Kind::Nbd,
        }
    }
}

/// Errors setting up the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter did not compile (a bug in the rules).
    #[error("cannot build the seccomp filter of {kind} threads: {source}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's reason.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the SIGSYS handler.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// `install` was called twice.
    #[error("seccomp filters are installed already")]
    Twice,
}

/// The compiled filters, by `Kind` (index in `KINDS`); unset with `none`.
static PROGRAMS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

thread_local! {
    /// The kind whose filter this thread installed (for the SIGSYS message).
    static CONFINED: Cell<Option<Kind>> = const { Cell::new(None) };
}

/// Compiles the filters for `mode` and registers the hook that confines
/// the block layer's threads as they start. Call before any thread starts.
pub fn install(mode: Mode) -> Result<(), SeccompError> {
    let action = match mode {
        Mode::None => return Ok(()),
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Trap => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let mut programs = Vec::with_capacity(KINDS.len());
    for kind in KINDS {
        let map: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = kind.rules().into_map();
        let build = |source| SeccompError::Build {
            kind: kind.name(),
            source,
        };
        let filter =
            SeccompFilter::new(map, action.clone(), SeccompAction::Allow, arch()).map_err(build)?;
        programs.push(BpfProgram::try_from(filter).map_err(build)?);
    }
    if mode == Mode::Trap {
        install_sigsys_handler()?;
    }
    PROGRAMS.set(programs).map_err(|_| SeccompError::Twice)?;
    vubd_backend::thread_kind::set_start_hook(|k| enter(k.into()));
    Ok(())
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    return TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
}

/// Confines the calling thread to `kind`'s allow-list (nothing if
/// filters are off). A thread that cannot be confined must not run
/// unconfined: the process aborts.
pub fn enter(kind: Kind) {
    let Some(programs) = PROGRAMS.get() else {
        return;
    };
    let index = KINDS.iter().position(|k| *k == kind).unwrap_or(0);
    if let Err(e) = apply_filter(&programs[index]) {
        eprintln!(
            "vubd: error: cannot confine a {} thread with seccomp: {e}",
            kind.name()
        );
        std::process::abort();
    }
    CONFINED.with(|c| c.set(Some(kind)));
}

/// `enter(kind)` the first time a thread calls it: for threads vubd does
/// not start itself (vhost-user-backend's queue threads).
pub fn enter_once(kind: Kind) {
    if PROGRAMS.get().is_some() && CONFINED.with(Cell::get).is_none() {
        enter(kind);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes
    // async-signal-safe calls.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = sigsys_handler as *const () as usize;
        // After the message the default action (death by SIGSYS) applies,
        // also to a second denied call inside the handler.
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Offset of `si_syscall` in `siginfo_t` for SIGSYS on 64-bit Linux:
/// after signo, errno, code (padded to 16) and the call address.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; its layout has
    // the call number at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let kind = CONFINED.with(Cell::get).map_or("inherited", Kind::name);
    let mut thread_name = [0u8; 16];
    // SAFETY: prctl(PR_GET_NAME) writes at most 16 bytes.
    let got = unsafe { libc::prctl(libc::PR_GET_NAME, thread_name.as_mut_ptr()) } == 0;
    let name_len = if got {
        thread_name.iter().position(|b| *b == 0).unwrap_or(16)
    } else {
        0
    };
    let mut msg = Message::default();
    msg.push(b"vubd: seccomp: thread '");
    msg.push(&thread_name[..name_len]);
    msg.push(b"' (filter: ");
    msg.push(kind.as_bytes());
    msg.push(b") made forbidden system call ");
    msg.push_number(nr);
    msg.push(b"; --seccomp log lets it pass and logs it\n");
    // SAFETY: write and raise are async-signal-safe.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::raise(libc::SIGSYS);
    }
}

/// A fixed buffer for the handler's message: no allocation in a handler.
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i32) {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let mut v = i64::from(n).unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            i -= 1;
            digits[i] = b'-';
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests;
